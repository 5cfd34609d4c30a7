"""API keys of the owner: list, create (the key is shown once), revoke."""

from __future__ import annotations

import datetime as dt

from flask import jsonify

from vault import api_keys
from vault.errors import InvalidInput, NotFound
from vault.models import utcnow
from web.api.blueprint import (
    ApiBlueprint,
    items_of,
    json_body,
    json_request,
    json_response,
    ref,
    state,
    string_field,
)
from web.auth import require

bp = ApiBlueprint("keys", __name__, tag="api-keys")

MAX_ID = 2**31 - 1


def create_key_for(p, name: str, scopes: object, expires_in_days: object):
    """Create a key for the caller's owner; no key or role may grant more than it holds."""
    scopes = api_keys.validate_scopes(scopes)
    beyond = sorted(set(scopes) - set(p.scopes))
    if beyond:
        from web.errors import Forbidden

        raise Forbidden(f"cannot grant scope(s) you do not hold: {', '.join(beyond)}")
    expires = None
    if isinstance(expires_in_days, float) and expires_in_days.is_integer():
        expires_in_days = int(expires_in_days)  # JSON Schema: 30.0 is an integer
    if expires_in_days is not None:
        if isinstance(expires_in_days, bool) or not isinstance(expires_in_days, int) or not (
                1 <= expires_in_days <= api_keys.MAX_EXPIRY_DAYS):
            raise InvalidInput(f"'expires_in_days' must be an integer from 1 to "
                               f"{api_keys.MAX_EXPIRY_DAYS}")
        expires = utcnow() + dt.timedelta(days=expires_in_days)
    with state().vault.session() as s:
        key, token = api_keys.create_key(s, p.owner, name, scopes, expires_at=expires,
                                         actor=p.actor)
        return {"key": api_keys.describe_key(key), "token": token}


@bp.op("/api-keys", "GET", summary="The owner's API keys (never the keys themselves)",
       scope="admin", responses={"200": json_response("the keys", items_of("ApiKey"))})
def list_keys():
    p = require("admin")
    with state().vault.session() as s:
        return jsonify({"items": [api_keys.describe_key(k)
                                  for k in api_keys.list_keys(s, p.owner)]})


@bp.op("/api-keys", "POST", summary="Create an API key; the response holds the key, shown "
       "this once", scope="admin",
       body=json_request({"type": "object", "required": ["name", "scopes"],
                          "additionalProperties": False,
                          "properties": {
                              "name": {"type": "string", "minLength": 1, "maxLength": 64,
                                       # printable: no control character, not blank
                                       "pattern": r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f]"
                                                  r"[^\x00-\x1f\x7f]*$(?!\n)"},
                              "scopes": {"type": "array", "minItems": 1, "items": {
                                  "type": "string", "enum": list(api_keys.SCOPES)}},
                              "expires_in_days": {
                                  "type": ["integer", "null"], "minimum": 1,
                                  "maximum": api_keys.MAX_EXPIRY_DAYS,
                                  "description": "null or absent: the key never expires"}}}),
       responses={"201": json_response("created", ref("ApiKeyCreated"))})
def create_key():
    p = require("admin")
    doc = json_body(required=("name", "scopes"), optional=("expires_in_days",))
    name = string_field(doc, "name", max_len=64)
    return jsonify(create_key_for(p, name, doc["scopes"], doc.get("expires_in_days"))), 201


@bp.op("/api-keys/<int:key_id>", "DELETE", summary="Revoke an API key (at once)",
       scope="admin", path_params={"key_id": {"type": "integer", "minimum": 0}},
       responses={"200": json_response("revoked", ref("ApiKey"))})
def revoke_key(key_id: int):
    p = require("admin")
    if key_id > MAX_ID:
        raise NotFound(f"no API key {key_id}")
    with state().vault.session() as s:
        key = api_keys.get_key(s, p.owner, key_id)
        api_keys.revoke_key(s, key, actor=p.actor)
        return jsonify(api_keys.describe_key(key))
