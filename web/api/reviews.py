"""The dedupe review queue (enrollments held because they resemble someone) and
not-same pairs (twins, siblings: never flagged again)."""

from __future__ import annotations

from flask import jsonify
from sqlalchemy import select
from sqlalchemy.orm import aliased

from vault import audit, identities
from vault.errors import NotFound
from vault.models import REVIEW_STATUSES, Identity, NotSamePair, Review
from web.api.blueprint import (
    HANDLE_SCHEMA,
    ApiBlueprint,
    choice_arg,
    items_of,
    json_body,
    json_request,
    json_response,
    query_param,
    ref,
    state,
    string_field,
)
from web.auth import handle_in_owner, require

bp = ApiBlueprint("reviews", __name__, tag="reviews")

MAX_ID = 2**31 - 1
REVIEW_ID = {"review_id": {"type": "integer", "minimum": 0}}


def own_review(review_id: int, owner: str) -> None:
    if review_id > MAX_ID:
        raise NotFound(f"no review {review_id}")
    with state().vault.session() as s:
        owner_id = identities.get_owner(s, owner).id
        row = s.get(Review, review_id)
        if row is None or row.owner_id != owner_id:
            raise NotFound(f"no review {review_id}")


@bp.op("/reviews", "GET", summary="Enrollments held for review (oldest first)",
       scope="identities:read",
       query=[query_param("status", {"type": "string", "enum": list(REVIEW_STATUSES)},
                          "which reviews (default pending)")],
       responses={"200": json_response("the reviews", items_of("Review"))})
def list_reviews():
    p = require("identities:read")
    status = choice_arg("status", REVIEW_STATUSES, "pending")
    return jsonify({"items": state().vault.list_reviews(p.owner, status=status)})


def _decide(review_id: int, accept: bool):
    p = require("identities:write")
    own_review(review_id, p.owner)
    st = state()
    return jsonify(st.vault.decide_review(review_id, accept, actor=p.actor))


@bp.op("/reviews/<int:review_id>/accept", "POST", summary="Different people: activate the "
       "held identity and record a not-same pair", scope="identities:write",
       path_params=REVIEW_ID, responses={"200": json_response("decided", ref("Review"))})
def accept_review(review_id: int):
    return _decide(review_id, True)


@bp.op("/reviews/<int:review_id>/reject", "POST", summary="The same person: erase the held "
       "identity (the response holds the signed receipt)", scope="identities:write",
       path_params=REVIEW_ID, responses={"200": json_response("decided", ref("Review"))})
def reject_review(review_id: int):
    return _decide(review_id, False)


@bp.op("/not-same", "GET", summary="Pairs recorded as different people",
       scope="identities:read",
       responses={"200": json_response("the pairs", items_of("NotSamePair"))})
def list_not_same():
    p = require("identities:read")
    a, b = aliased(Identity), aliased(Identity)
    with state().vault.session() as s:
        owner = identities.get_owner(s, p.owner)
        rows = s.execute(select(a.name, b.name, NotSamePair.created_at)
                         .join(a, a.id == NotSamePair.identity_a)
                         .join(b, b.id == NotSamePair.identity_b)
                         .where(NotSamePair.owner_id == owner.id).order_by(NotSamePair.id))
        items = [{"a": f"{p.owner}/{x}", "b": f"{p.owner}/{y}",
                  "created_at": audit.canonical_time(at)} for x, y, at in rows]
    return jsonify({"items": items})


@bp.op("/not-same", "POST", summary="Record two identities as different people",
       scope="identities:write",
       body=json_request({"type": "object", "required": ["a", "b"],
                          "additionalProperties": False,
                          "properties": {"a": HANDLE_SCHEMA, "b": HANDLE_SCHEMA}},
                         "two handles of the owner"),
       responses={"201": json_response("recorded", ref("NotSamePair"))})
def create_not_same():
    p = require("identities:write")
    doc = json_body(required=("a", "b"))
    handles = []
    for key in ("a", "b"):
        raw = string_field(doc, key, max_len=80)
        owner, _, name = raw.removeprefix("@").partition("/")
        handles.append(handle_in_owner(p, owner, name))
    st = state()
    st.vault.record_not_same(*handles, actor=p.actor)
    with st.vault.session() as s:
        ids = sorted(identities.get_identity(s, h).id for h in handles)
        pair = s.scalar(select(NotSamePair).where(NotSamePair.identity_a == ids[0],
                                                  NotSamePair.identity_b == ids[1]))
        created = audit.canonical_time(pair.created_at)
    return jsonify({"a": handles[0], "b": handles[1], "created_at": created}), 201
