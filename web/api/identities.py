"""Identities: create with consent, list with paging, get by handle, delete with a receipt;
and their consent (view, withdraw)."""

from __future__ import annotations

import hashlib

from flask import jsonify, request
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from vault import identities
from vault.consent import FIELDS, ConsentRequest
from vault.errors import InvalidConsent, InvalidInput
from vault.handles import validate_name
from vault.models import IDENTITY_STATUSES, Identity
from web.api.blueprint import (
    HANDLE_PARAMS,
    ApiBlueprint,
    choice_arg,
    int_arg,
    json_body,
    json_request,
    json_response,
    query_param,
    ref,
    state,
    string_field,
)
from web.auth import handle_in_owner, require

bp = ApiBlueprint("identities", __name__, tag="identities")

WEB_CONSENT_FIELDS = tuple(f for f in FIELDS if f != "evidence_file")


def parse_consent(doc: object, evidence: bytes | None = None) -> ConsentRequest:
    """A consent record from a request. ``evidence_file`` names a server path, so the web
    takes the evidence itself (its SHA-256 is recorded) or its digest instead."""
    if not isinstance(doc, dict):
        raise InvalidConsent("'consent' must be a JSON object (fields: "
                             f"{', '.join(WEB_CONSENT_FIELDS)})")
    if "evidence_file" in doc:
        raise InvalidConsent("'evidence_file' is not accepted over the web: send "
                             "'evidence_sha256', or upload the evidence itself")
    doc = dict(doc)
    if evidence is not None:
        digest = hashlib.sha256(evidence).hexdigest()
        if doc.get("evidence_sha256") not in (None, "", digest):
            raise InvalidConsent("'evidence_sha256' does not match the uploaded evidence")
        doc["evidence_sha256"] = digest
    return ConsentRequest.from_dict(doc)


def describe_for(scope: str, owner: str, name: str) -> dict:
    """``Vault.describe`` of ``owner/name`` for a caller holding ``scope``: the key, then the
    identity, each one Core SELECT on one read connection (metadata only; nothing
    decrypted; nothing cached, so a revocation, an erasure or a withdrawal shows at once)."""
    with state().read_connection() as conn:
        p = require(scope, conn=conn)
        return identities.describe_handle(conn, handle_in_owner(p, owner, name))


@bp.op("/identities", "GET", summary="List the owner's identities, by name, a page at a time",
       scope="identities:read",
       query=[query_param("limit", {"type": "integer", "minimum": 1, "maximum": 500},
                          "page size (default 50)"),
              query_param("cursor", {"type": "string", "maxLength": 64},
                          "the next_cursor of the previous page"),
              query_param("status", {"type": "string", "enum": list(IDENTITY_STATUSES)},
                          "only identities in this status")],
       responses={"200": json_response("a page of identities", ref("IdentityPage"))})
def list_identities():
    p = require("identities:read")
    limit = int_arg("limit", 50, lo=1, hi=500)
    cursor = request.args.get("cursor")
    if cursor is not None and len(cursor) > 64:
        raise InvalidInput("query parameter 'cursor' is at most 64 characters")
    status = choice_arg("status", IDENTITY_STATUSES, None)
    with state().read_session() as s:
        owner = identities.get_owner(s, p.owner)
        q = (select(Identity).where(Identity.owner_id == owner.id).order_by(Identity.name)
             .limit(limit + 1)
             .options(selectinload(Identity.consents), selectinload(Identity.owner),
                      selectinload(Identity.artifacts)))
        if cursor:
            q = q.where(Identity.name > cursor)
        if status:
            q = q.where(Identity.status == status)
        rows = list(s.scalars(q))
        more = len(rows) > limit
        rows = rows[:limit]
        return jsonify({"items": [identities.describe_identity(i) for i in rows],
                        "next_cursor": rows[-1].name if more else None})


@bp.op("/identities", "POST", summary="Create an identity with its consent record (no photos)",
       scope="identities:write",
       body=json_request(ref("IdentityCreate")),
       responses={"201": json_response("created", ref("Identity")),
                  "422": json_response("the consent record is refused on what it says (e.g. "
                                       "'retain_until' not in the future)", ref("Error"))},
       description="Enroll photos afterwards with `POST /identities/{owner}/{name}/enroll`, "
                   "or create and enroll in one call there.")
def create_identity():
    p = require("identities:write")
    doc = json_body(required=("name", "consent"))
    name = string_field(doc, "name", max_len=64)
    validate_name(name)
    request_ = parse_consent(doc["consent"])
    created = state().vault.create_identity(f"{p.owner}/{name}", request_, actor=p.actor)
    return jsonify(created), 201


@bp.op("/identities/<owner>/<name>", "GET", summary="An identity by handle: consent and "
       "artifact metadata (nothing decrypted)", scope="identities:read",
       path_params=HANDLE_PARAMS,
       responses={"200": json_response("the identity", ref("Identity"))})
def get_identity(owner: str, name: str):
    return jsonify(describe_for("identities:read", owner, name))


@bp.op("/identities/<owner>/<name>", "DELETE", summary="Erase an identity (crypto-shred) and "
       "return the signed erasure receipt", scope="identities:write",
       path_params=HANDLE_PARAMS,
       responses={"200": json_response("the signed receipt", ref("SignedReceipt"))})
def delete_identity(owner: str, name: str):
    p = require("identities:write")
    handle = handle_in_owner(p, owner, name)
    st = state()
    st.vault.describe(handle)  # 404 before anything is touched
    receipt = st.vault.delete_identity(handle, actor=p.actor,
                                       reason=f"requested by {p.actor}")
    return jsonify(receipt)


@bp.op("/identities/<owner>/<name>/consent", "GET", summary="The identity's consent record",
       scope="identities:read", path_params=HANDLE_PARAMS,
       responses={"200": json_response("the consent record", ref("Consent"))})
def get_consent(owner: str, name: str):
    return jsonify(describe_for("identities:read", owner, name)["consent"])


@bp.op("/identities/<owner>/<name>/receipt", "GET",
       summary="The signed receipt of the identity's completed erasure, again",
       scope="identities:read", path_params=HANDLE_PARAMS,
       responses={"200": json_response("the signed receipt, as stored when the erasure "
                                       "completed", ref("SignedReceipt"))},
       description="Every completed erasure stores its receipt. 404 when no identity of "
                   "this handle was erased; 409 while its erasure is unfinished.")
def get_erasure_receipt(owner: str, name: str):
    p = require("identities:read")
    return jsonify(state().vault.erasure_receipt(handle_in_owner(p, owner, name)))


@bp.op("/identities/<owner>/<name>/consent/withdraw", "POST",
       summary="Withdraw consent: blocked at once, erased per the owner's policy",
       scope="identities:write", path_params=HANDLE_PARAMS,
       body={"required": False, "content": {"application/json": {"schema": {
           "type": "object", "additionalProperties": False,
           "properties": {"reason": {"type": "string", "minLength": 1, "maxLength": 500,
                                     "pattern": r"\S"}}}}}},
       responses={"200": json_response("withdrawn (and the receipt when erased at once)",
                                       ref("Withdrawal"))})
def withdraw_consent(owner: str, name: str):
    p = require("identities:write")
    handle = handle_in_owner(p, owner, name)
    reason = None
    if request.get_data(cache=True).strip():
        doc = json_body(optional=("reason",))
        reason = string_field(doc, "reason", max_len=500, required=False)
    st = state()
    result = st.vault.withdraw_consent(handle, reason=reason, actor=p.actor)
    return jsonify(result)
