"""The OpenAPI 3 document of ``/v1``, built from the routes' own declarations.

Every route of ``web/api/*`` is declared with ``ApiBlueprint.op`` (path,
method, scope, parameters, request body, responses); this module adds the
shared schemas and the security schemes. tests/web/api/test_openapi.py checks
that the document validates, that it lists exactly the app's ``/v1`` routes,
and a property-based fuzzer (schemathesis) checks the responses against it;
tests/web/api/test_schemathesis_server.py runs schemathesis with its default
checks over a running server. It is OpenAPI 3.1, so that it can say the rules
the server checks (``if``/``then``, ``contains``, ``propertyNames``, ``not``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version

from vault.api_keys import SCOPES
from vault.consent import GIVEN_BY, PURPOSES
from vault.models import IDENTITY_STATUSES, JOB_STATUSES, REVIEW_STATUSES
from web.api.blueprint import NAME_SCHEMA, ApiBlueprint

STR = {"type": "string"}
NSTR = {"type": "string", "nullable": True}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
OBJ = {"type": "object"}


def _obj(props: dict, required: list[str] | None = None, **extra: object) -> dict:
    return {"type": "object", "required": list(props) if required is None else required,
            "properties": props, **extra}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: dict[str, dict] = {
    "Error": _obj({"error": _obj({
        "code": {"type": "string", "description": "stable, machine-readable"},
        "message": {"type": "string", "description": "what is wrong and what to do"},
        "details": {"type": "object", "description": "structured extras"}})}),
    "Health": _obj({"status": {"type": "string", "enum": ["ok"]}}),
    "Me": _obj({
        "via": {"type": "string", "enum": ["api_key", "session"]},
        "owner": {**_obj({"name": STR, "kind": STR}), "nullable": True},
        "scopes": {"type": "array", "items": {"type": "string", "enum": list(SCOPES)}},
        "role": NSTR, "username": NSTR,
        "key": {**_obj({"id": INT, "prefix": STR, "name": STR}), "nullable": True}}),
    "Owner": _obj({"name": STR, "kind": {"type": "string", "enum": ["family", "studio"]},
                   "erase_policy": {"type": "string", "enum": ["immediate", "retain"]},
                   "identities": INT, "created_at": STR}),
    "Member": _obj({"username": STR,
                    "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
                    "since": STR, "last_login_at": NSTR}),
    "ConsentInput": {
        "type": "object", "additionalProperties": False,
        "required": ["subject", "given_by", "purposes", "retain_until", "evidence_sha256"],
        "description": "docs/consent.md; evidence as 'evidence_sha256' (the web does not "
                       "take 'evidence_file'). 'retain_until' must be in the future (422).",
        "properties": {
            "subject": {"type": "string", "minLength": 1, "maxLength": 200,
                        "pattern": r"\S"},
            "given_by": {"type": "string", "enum": list(GIVEN_BY)},
            "guardian_name": {"type": "string", "maxLength": 200, "nullable": True},
            "purposes": {"type": "array", "minItems": 1,
                         "items": {"type": "string", "enum": list(PURPOSES)},
                         "contains": {"const": "enroll"}},
            "retain_until": {"type": "string", "format": "date"},
            "evidence_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
        # The rules between fields (vault.consent.ConsentRequest.from_dict).
        "allOf": [
            {"if": {"required": ["given_by"], "properties": {"given_by": {"const": "guardian"}}},
             "then": {"required": ["guardian_name"], "properties": {"guardian_name": {
                 "type": "string", "pattern": r"\S"}}},
             "else": {"properties": {"guardian_name": {
                 "anyOf": [{"type": "null"}, {"const": ""}]}}}},
            {"if": {"required": ["purposes"], "properties": {"purposes": {
                "contains": {"const": "commercial"}}}},
             "then": {"properties": {"purposes": {"contains": {"const": "generate"}}}}}]},
    # The consent record as a form field of an enrollment (JSON text): the evidence may be
    # the uploaded 'evidence' instead, and the rules between fields are left to the 422:
    # schemathesis 4.32 cannot check 'if' beside the form's file parts.
    "ConsentForm": {
        "type": "object", "additionalProperties": False,
        "required": ["subject", "given_by", "purposes", "retain_until"],
        "description": "as ConsentInput; 'evidence_sha256' or the form's 'evidence'",
        "properties": {
            "subject": {"type": "string", "minLength": 1, "maxLength": 200,
                        "pattern": r"\S"},
            "given_by": {"type": "string", "enum": list(GIVEN_BY)},
            "guardian_name": {"type": "string", "maxLength": 200, "nullable": True},
            "purposes": {"type": "array", "minItems": 1,
                         "items": {"type": "string", "enum": list(PURPOSES)}},
            "retain_until": {"type": "string", "format": "date"},
            "evidence_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}},
    "Consent": _obj({
        "id": STR, "subject": STR, "given_by": {"type": "string", "enum": list(GIVEN_BY)},
        "guardian_name": NSTR, "purposes": {"type": "array", "items": STR},
        "retain_until": STR, "evidence_sha256": STR, "given_at": STR, "withdrawn_at": NSTR,
        "withdrawal_reason": NSTR,
        "status": {"type": "string", "enum": ["active", "withdrawn", "expired"]}}),
    "Artifact": _obj({"id": STR, "kind": STR, "schema_version": INT, "model_id": STR,
                      "size": INT, "sha256": STR, "shapes": OBJ, "created_at": STR}),
    "Identity": _obj({
        "handle": STR, "id": STR, "owner": STR, "owner_kind": STR,
        "status": {"type": "string", "enum": list(IDENTITY_STATUSES)}, "created_at": STR,
        "consent": _ref("Consent"), "artifacts": {"type": "array", "items": _ref("Artifact")}}),
    "IdentityPage": _obj({"items": {"type": "array", "items": _ref("Identity")},
                          "next_cursor": NSTR}),
    "IdentityCreate": {"type": "object", "additionalProperties": False,
                       "required": ["name", "consent"],
                       "properties": {"name": NAME_SCHEMA,
                                      "consent": _ref("ConsentInput")}},
    "SignedReceipt": _obj({
        "receipt": _obj({"type": STR, "handle": STR, "identity": STR, "erased_at": STR,
                         "reason": STR, "artifacts": {"type": "array", "items": OBJ},
                         "data_key": OBJ, "generated_images_removed": INT,
                         "audit_seq": INT}),
        "signature": _obj({"alg": STR, "key_id": STR, "public_key": STR, "value": STR})}),
    "Withdrawal": _obj({"handle": STR, "withdrawn": BOOL,
                        "erase_policy": {"type": "string", "enum": ["immediate", "retain"]},
                        "receipt": _ref("SignedReceipt")},
                       required=["handle", "withdrawn", "erase_policy"]),
    "Match": _obj({"handle": STR, "score": NUM,
                   "decision": {"type": "string", "enum": ["block", "review", "new"]}}),
    "PhotoResult": _obj({"photo": STR, "faces_found": INT, "face": INT, "det_score": NUM,
                         "face_px": NUM, "blur": NUM}),
    "PhotoCheck": _obj({"photo": STR, "ok": BOOL, "reason": NSTR, "faces_found": INT,
                        "face": INT, "det_score": NUM, "face_px": NUM, "blur": NUM},
                       required=["photo", "ok", "reason"]),
    "PhotoChecks": _obj({"photos": {"type": "array", "items": _ref("PhotoCheck")}}),
    "EnrollmentReport": _obj({
        "handle": STR, "status": {"type": "string", "enum": ["active", "held", "updated"]},
        "photos": {"type": "array", "items": _ref("PhotoResult")},
        "top_match": {**_ref("Match"), "nullable": True},
        "review_id": {"type": "integer", "nullable": True},
        "artifacts": {"type": "array", "items": _obj({"id": STR, "kind": STR,
                                                      "model_id": STR, "size": INT})},
        "timings": OBJ}),
    "KindsReport": _obj({
        "handle": STR, "status": {"type": "string", "enum": ["added", "unchanged"]},
        "kinds": {"type": "array", "items": STR},
        "artifacts": {"type": "array", "items": _obj({"id": STR, "kind": STR,
                                                      "model_id": STR, "size": INT,
                                                      "replaced": NSTR})},
        "present": {"type": "object", "description": "kinds asked for and already held "
                    "(no photos given): their model ids",
                    "additionalProperties": {"type": "array", "items": STR}},
        "photos": {"type": "array", "items": _obj(
            {"photo": STR, "faces_found": INT, "face": INT, "det_score": NUM,
             "face_px": NUM, "blur": NUM, "similarity": NUM})},
        "threshold": {"type": "number", "nullable": True,
                      "description": "the similarity each photo had to reach"},
        "timings": OBJ}),
    "Review": _obj({"id": INT, "handle": STR, "candidate": STR, "score": NUM,
                    "status": {"type": "string", "enum": list(REVIEW_STATUSES)},
                    "created_at": STR, "decided_at": NSTR, "decided_by": NSTR,
                    "receipt": _ref("SignedReceipt")},
                   required=["id", "handle", "candidate", "score", "status", "created_at",
                             "decided_at", "decided_by"]),
    "NotSamePair": _obj({"a": STR, "b": STR, "created_at": STR}),
    "JobKind": _obj({"kind": STR, "scope": {"type": "string", "enum": list(SCOPES)},
                     "description": STR, "needs_identity": BOOL, "trusted_params": BOOL}),
    "Job": _obj({
        "id": STR, "kind": STR, "status": {"type": "string", "enum": list(JOB_STATUSES)},
        "progress": {"type": "number", "minimum": 0, "maximum": 1}, "message": NSTR,
        "identity": NSTR, "params": OBJ, "result": {"type": "object", "nullable": True},
        "error": NSTR, "cancel_requested": BOOL, "attempts": INT, "created_at": STR,
        "started_at": NSTR, "finished_at": NSTR}),
    "Verification": _obj({
        "status": {"type": "string",
                   "enum": ["valid", "altered", "unknown_signature", "no_manifest"]},
        "ok": BOOL, "message": STR, "reason": NSTR, "key_id": NSTR,
        "manifest": {"type": "object", "nullable": True,
                     "description": "valid: what was used; otherwise the unverified claim"},
        "summary": {"type": "array", "items": STR}}),
    "AuditEvent": _obj({"seq": INT, "at": STR, "action": STR, "actor": STR, "owner": NSTR,
                        "subject": NSTR, "details": OBJ}),
    "AuditPage": _obj({"items": {"type": "array", "items": _ref("AuditEvent")},
                       "next_before": {"type": "integer", "nullable": True}}),
    "AuditVerify": _obj({"ok": BOOL, "owner_events": INT,
                         "first_bad_seq": {"type": "integer", "nullable": True},
                         "reason": NSTR}),
    "ApiKey": _obj({"id": INT, "name": STR, "prefix": STR,
                    "scopes": {"type": "array", "items": {"type": "string",
                                                          "enum": list(SCOPES)}},
                    "status": {"type": "string", "enum": ["active", "revoked", "expired"]},
                    "created_at": STR, "expires_at": NSTR, "revoked_at": NSTR,
                    "last_used_at": NSTR}),
    "ApiKeyCreated": _obj({"key": _ref("ApiKey"),
                           "token": {"type": "string", "description": "the key, shown once"}}),
}

DESCRIPTION = """\
The idvault JSON API: identities with consent, enrollment from photos with
dedupe, the review queue, sealed artifacts and their exports, jobs, the audit
log and API keys. Every request acts for exactly one owner (the API key's, or
the signed-in user's current one); other owners' handles answer 404 as if
they did not exist. Every failure has the shape
`{"error": {"code", "message", "details"}}`. See docs/web.md.
"""


def _nullable_as_31(node: object) -> object:
    """The schemas here say ``nullable: true`` (short, as in OpenAPI 3.0); the document is
    OpenAPI 3.1 (full JSON Schema: ``if``/``then``, ``contains``, ``propertyNames`` say
    rules 3.0 cannot), where null is a type: rewrite each such schema."""
    if isinstance(node, list):
        return [_nullable_as_31(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable_as_31(v) for k, v in node.items() if k != "nullable"}
    if not node.get("nullable"):
        return out
    if "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
        return out
    return {"anyOf": [out, {"type": "null"}]}


# Any text: a form field is text whatever it spells, so no value breaks a type here.
CSRF_FIELD = {"description": "a session's CSRF token (or the X-CSRF-Token header)"}


def _closed_forms(body: dict) -> dict:
    """A request body whose multipart form takes only its listed fields (and a session's
    CSRF token), as ``web.api.enrollment.multipart`` enforces: unknown ones get 400."""
    content = dict(body.get("content", {}))
    form = content.get("multipart/form-data")
    if form:
        schema = form["schema"]
        content["multipart/form-data"] = {**form, "schema": {
            **schema, "additionalProperties": False,
            "properties": {**schema["properties"], "csrf_token": CSRF_FIELD}}}
    return {**body, "content": content}


def _with_job_kinds(body: dict, kinds: list[str]) -> dict:
    content = body["content"]["application/json"]
    schema = content["schema"]
    props = {**schema["properties"], "kind": {**schema["properties"]["kind"], "enum": kinds}}
    return {**body, "content": {"application/json": {
        **content, "schema": {**schema, "properties": props}}}}


_JOB_LINKS = {"GetJob": ("get_job", {"job_id": "$response.body#/id"}),
              "CancelJob": ("cancel_job", {"job_id": "$response.body#/id"})}
# OpenAPI links: where the ids a response returns lead (clients, and schemathesis' stateful
# phase, follow them), by (operationId, status).
LINKS: dict[tuple[str, str], dict[str, tuple[str, dict[str, str]]]] = {
    ("submit_job", "202"): _JOB_LINKS,
    ("submit_generation", "202"): _JOB_LINKS,
    ("submit_personalization", "202"): _JOB_LINKS,
    ("create_key", "201"): {"RevokeKey": ("revoke_key", {"key_id": "$response.body#/key/id"})},
}


def _with_links(operation_id: str, responses: dict) -> dict:
    out = dict(responses)
    for status, response in responses.items():
        links = LINKS.get((operation_id, status))
        if links:
            out[status] = {**response, "links": {
                name: {"operationId": target, "parameters": params}
                for name, (target, params) in links.items()}}
    return out


def openapi_path(rule: str) -> str:
    """A Flask rule (relative to /v1) as an OpenAPI path."""
    return "/v1" + re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)


def _version() -> str:
    try:
        return version("idvault")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0"


def build_document(blueprints: Iterable[ApiBlueprint], *,
                   job_kinds: list[str] | None = None) -> dict:
    """The document of the given area blueprints' operations, tags in their order;
    ``job_kinds``: the kinds ``POST /jobs`` takes on this server."""
    paths: dict[str, dict] = {}
    tags = []
    for bp in blueprints:
        tags.append({"name": bp.tag})
        for op in bp.operations:
            entry: dict = {
                "operationId": op.operation_id, "summary": op.summary, "tags": [op.tag],
                "responses": {**_with_links(op.operation_id, op.responses), "default": {
                    "description": "an error (401 unauthenticated, 403 scope or role, 404 "
                                   "not found or another owner's, 4xx invalid input, 5xx)",
                    "content": {"application/json": {"schema": _ref("Error")}}}},
            }
            description = op.description
            if op.scope:
                description = f"Scope: `{op.scope}`. {description}".strip()
            # The scope needed: a scope, 'public', or 'authenticated' (any valid caller;
            # the description says when the need depends on the request).
            entry["x-scope"] = op.scope or ("public" if op.public else "authenticated")
            if description:
                entry["description"] = description
            params = op.parameters + op.query
            if params:
                entry["parameters"] = params
            if op.body is not None:
                entry["requestBody"] = _closed_forms(op.body)
                if op.operation_id == "submit_job" and job_kinds is not None:
                    entry["requestBody"] = _with_job_kinds(entry["requestBody"], job_kinds)
            if op.public:
                entry["security"] = []
            paths.setdefault(openapi_path(op.rule), {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "idvault API", "version": _version(), "description": DESCRIPTION},
        "servers": [{"url": "/"}],
        "tags": tags,
        "security": [{"apiKey": []}, {"session": []}],
        "paths": _nullable_as_31(paths),
        "components": {
            "schemas": _nullable_as_31(SCHEMAS),
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer",
                           "description": "an API key: `Authorization: Bearer idv_...`"},
                "session": {"type": "apiKey", "in": "cookie", "name": "idvault_session",
                            "description": "the UI's session; unsafe methods also need the "
                                           "X-CSRF-Token header"},
            },
        },
    }
