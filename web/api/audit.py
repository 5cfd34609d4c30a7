"""The owner's audit events (newest first) and a check of the whole hash chain."""

from __future__ import annotations

from flask import jsonify, request

from vault import audit
from vault.errors import InvalidInput
from vault.handles import Handle
from web.api.blueprint import (
    HANDLE_SCHEMA,
    ApiBlueprint,
    int_arg,
    json_response,
    query_param,
    ref,
    state,
)
from web.auth import require

bp = ApiBlueprint("audit", __name__, tag="audit")


def describe_event(e) -> dict:
    return {"seq": e.seq, "at": audit.canonical_time(e.at), "action": e.action,
            "actor": e.actor, "owner": e.owner, "subject": e.subject, "details": e.details}


@bp.op("/audit", "GET", summary="The owner's audit events, newest first",
       scope="identities:read",
       query=[query_param("limit", {"type": "integer", "minimum": 1, "maximum": 500},
                          "page size (default 100)"),
              query_param("before", {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
                          "only events older than this sequence number (the next_before of "
                          "the previous page)"),
              query_param("subject", HANDLE_SCHEMA,
                          "only events about this handle (OWNER/NAME)")],
       responses={"200": json_response("a page of events", ref("AuditPage"))})
def list_events():
    p = require("identities:read")
    limit = int_arg("limit", 100, lo=1, hi=500)
    before = int_arg("before", 0, lo=1, hi=2**31 - 1) if "before" in request.args else None
    subject = request.args.get("subject")
    if subject is not None:
        if len(subject) > 80:
            raise InvalidInput("'subject' is a handle, at most 80 characters")
        subject = str(Handle.parse(subject))
    with state().vault.session() as s:
        rows = audit.events(s, owner=p.owner, subject=subject, limit=limit + 1, before=before)
        items = [describe_event(e) for e in rows[:limit]]
    return jsonify({"items": items,
                    "next_before": items[-1]["seq"] if len(rows) > limit else None})


@bp.op("/audit/verify", "GET", summary="Check the audit log's hash chain (the whole vault's)",
       scope="admin", responses={"200": json_response("the result", ref("AuditVerify"))},
       description="Reports whether the chain is intact, and agrees with the signed "
                   "checkpoints of its head in the key store, and how many events this "
                   "owner has; it names the first bad event only when that event is this "
                   "owner's. The head itself is printed by `idvault audit verify` only: its "
                   "sequence number would tell one owner how busy the others are.")
def verify():
    p = require("admin")
    st = state()
    result = st.vault.verify_audit()
    with st.vault.session() as s:
        from sqlalchemy import func, select

        from vault.models import AuditEvent

        mine = s.scalar(select(func.count()).select_from(AuditEvent)
                        .where(AuditEvent.owner == p.owner)) or 0
        bad_is_mine = False
        if result.first_bad_seq is not None:
            bad = s.get(AuditEvent, result.first_bad_seq)
            bad_is_mine = bad is not None and bad.owner == p.owner
    return jsonify({"ok": result.ok, "owner_events": mine,
                    "first_bad_seq": result.first_bad_seq if bad_is_mine else None,
                    "reason": (result.reason if bad_is_mine else
                               None if result.ok else "the chain is broken; the operator "
                               "should run `idvault audit verify`")})
