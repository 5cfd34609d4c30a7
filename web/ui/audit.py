"""The owner-wide audit page, for the owner's admins: newest first, filtered, paged.

Paging is keyset on the event's sequence number (``before``: the last seq shown), so a
page stays correct while new events are appended. Filters are exact matches (action;
subject: a handle, a username or key:PREFIX, as the events name it; actor) and a date
range in UTC, both ends inclusive.
"""

from __future__ import annotations

import datetime as dt

from flask import Blueprint, request, url_for

from vault import audit
from vault.errors import InvalidInput
from web.auth import ui_login_required
from web.ui.common import me, page, state

bp = Blueprint("audit", __name__)
PAGE = 50


def _date(name: str) -> dt.date | None:
    raw = request.args.get(name, "").strip()
    if not raw:
        return None
    try:
        return dt.date.fromisoformat(raw)
    except ValueError:
        raise InvalidInput(f"'{name}' must be a date, YYYY-MM-DD (got {raw[:20]!r})") from None


def _filters() -> tuple[dict, dict]:
    """(the form's values as typed, the arguments of audit.events); InvalidInput names
    the field that is wrong."""
    form = {k: request.args.get(k, "").strip()[:128]
            for k in ("action", "subject", "actor", "since", "until")}
    query: dict = {}
    if form["action"]:
        if form["action"] not in audit.ACTIONS:
            raise InvalidInput(f"'action' must be one of the listed actions, not "
                               f"{form['action']!r}")
        query["action"] = form["action"]
    if form["subject"]:  # a handle, a username, key:PREFIX: as the events name it
        if len(form["subject"]) > 81:
            raise InvalidInput("'subject' is at most 80 characters")
        query["subject"] = form["subject"].removeprefix("@")
    if form["actor"]:
        query["actor"] = form["actor"]
    since, until = _date("since"), _date("until")
    if since and until and until < since:
        raise InvalidInput("'until' is before 'since'")
    if since:
        query["since"] = dt.datetime.combine(since, dt.time(), dt.UTC)
    if until:  # inclusive: up to the end of that day
        query["until"] = dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), dt.UTC)
    raw = request.args.get("before", "").strip()
    if raw:
        if not raw.isdigit() or not 0 < int(raw) < 2**31:
            raise InvalidInput("'before' is the sequence number of an event")
        query["before"] = int(raw)
    return form, query


@bp.route("/audit")
@ui_login_required("admin")
def events():
    p = me()
    try:
        form, query = _filters()
    except InvalidInput as exc:
        return page("audit.html", 400, events=[], form=request.args, error=str(exc),
                    actions=audit.ACTIONS, next_url=None, first_url=None)
    with state().vault.session() as s:
        rows = audit.events(s, owner=p.owner, limit=PAGE + 1, **query)
        shown = [{"seq": e.seq, "at": audit.canonical_time(e.at), "action": e.action,
                  "actor": e.actor, "subject": e.subject, "details": e.details}
                 for e in rows[:PAGE]]
    kept = {k: v for k, v in form.items() if v}
    next_url = url_for("ui.audit.events", before=shown[-1]["seq"], **kept) \
        if len(rows) > PAGE else None
    first_url = url_for("ui.audit.events", **kept) if "before" in query else None
    return page("audit.html", events=shown, form=form, actions=audit.ACTIONS, error=None,
                next_url=next_url, first_url=first_url)
