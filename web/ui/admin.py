"""Admin pages of an owner: API keys and members."""

from __future__ import annotations

from flask import Blueprint, redirect, request, url_for

from vault import accounts, api_keys
from vault.errors import VaultError
from web.api.keys import MAX_ID, create_key_for
from web.auth import ui_login_required
from web.ui.common import me, notice, page, state

bp = Blueprint("admin", __name__)


def _keys_page(status: int = 200, **ctx):
    p = me()
    with state().vault.session() as s:
        keys = [api_keys.describe_key(k) for k in api_keys.list_keys(s, p.owner)]
    return page("keys.html", status, keys=keys, scopes=api_keys.SCOPE_HELP, **ctx)


@bp.route("/api-keys", methods=["GET", "POST"])
@ui_login_required("admin")
def keys():
    if request.method == "GET":
        return _keys_page()
    p = me()
    days = request.form.get("expires_in_days", "").strip()
    try:
        created = create_key_for(p, request.form.get("name", ""),
                                 request.form.getlist("scopes"),
                                 int(days) if days.isdigit() else (None if not days else -1))
    except VaultError as exc:
        return _keys_page(400, error=str(exc))
    return _keys_page(201, created=created)


@bp.route("/api-keys/<int:key_id>/revoke", methods=["POST"])
@ui_login_required("admin")
def revoke(key_id: int):
    p = me()
    if key_id <= MAX_ID:
        with state().vault.session() as s:
            key = api_keys.get_key(s, p.owner, key_id)
            api_keys.revoke_key(s, key, actor=p.actor)
            notice(f"Revoked the key {key.name!r} ({key.prefix}).")
    return redirect(url_for("ui.admin.keys"))


@bp.route("/members", methods=["GET", "POST"])
@ui_login_required("admin")
def members():
    p = me()
    error = None
    if request.method == "POST":
        username = request.form.get("username", "").strip().lower()
        role = request.form.get("role", "")
        try:
            with state().vault.session() as s:
                if role == "remove":
                    accounts.revoke(s, username, p.owner, actor=p.actor)
                else:
                    accounts.grant(s, username, p.owner, role, actor=p.actor)
        except VaultError as exc:
            error = str(exc)
        else:
            notice(f"{username}: removed from {p.owner}." if role == "remove"
                   else f"{username} is {role} of {p.owner}.")
            return redirect(url_for("ui.admin.members"))
    with state().vault.session() as s:
        rows = accounts.members_of(s, p.owner)
    return page("members.html", 400 if error else 200, members=rows, roles=accounts.ROLES,
                role_scopes=accounts.ROLE_SCOPES, error=error)
