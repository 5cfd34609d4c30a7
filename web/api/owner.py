"""The caller's owner (family or studio) and its members (UI accounts with roles)."""

from __future__ import annotations

from flask import jsonify

from vault import accounts, identities
from vault.errors import NotFound
from web.api.blueprint import (
    ApiBlueprint,
    items_of,
    json_body,
    json_request,
    json_response,
    ref,
    state,
)
from web.auth import require

bp = ApiBlueprint("owner", __name__, tag="owner")

USERNAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9._@+-]{2,63}$", "example": "maria"}


@bp.op("/owner", "GET", summary="The owner this request acts for", scope="identities:read",
       responses={"200": json_response("the owner", ref("Owner"))})
def get_owner():
    p = require("identities:read")
    with state().vault.session() as s:
        o = identities.get_owner(s, p.owner)
        return jsonify({"name": o.name, "kind": o.kind, "erase_policy": o.erase_policy,
                        "identities": identities.count_identities(s, o.name),
                        "created_at": o.created_at.isoformat()})


@bp.op("/owner/members", "GET", summary="UI accounts that are members of this owner",
       scope="admin", responses={"200": json_response("the members", items_of("Member"))})
def list_members():
    p = require("admin")
    with state().vault.session() as s:
        return jsonify({"items": accounts.members_of(s, p.owner)})


@bp.op("/owner/members/<username>", "PUT", summary="Add a member, or change its role",
       scope="admin", path_params={"username": USERNAME},
       body=json_request({"type": "object", "required": ["role"],
                          "additionalProperties": False,
                          "properties": {"role": {"type": "string",
                                                  "enum": list(accounts.ROLES)}}}),
       responses={"200": json_response("the membership", ref("Member"))},
       description="The user must exist (`idvault user add`).")
def put_member(username: str):
    p = require("admin")
    doc = json_body(required=("role",))
    with state().vault.session() as s:
        accounts.grant(s, username, p.owner, doc["role"], actor=p.actor)
        member = next(m for m in accounts.members_of(s, p.owner) if m["username"] == username)
    return jsonify(member)


@bp.op("/owner/members/<username>", "DELETE", summary="Remove a member", scope="admin",
       path_params={"username": USERNAME},
       responses={"204": {"description": "removed"}})
def delete_member(username: str):
    p = require("admin")
    with state().vault.session() as s:
        try:
            accounts.revoke(s, username, p.owner, actor=p.actor)
        except NotFound:
            raise NotFound(f"{username} is not a member of {p.owner}") from None
    return "", 204
