"""The API's own routes: its OpenAPI document, a health check, and who am I."""

from __future__ import annotations

from flask import current_app, jsonify

from web.api.blueprint import ApiBlueprint, json_response, ref
from web.api.openapi import build_document
from web.auth import require

bp = ApiBlueprint("meta", __name__, tag="meta")


@bp.op("/openapi.json", "GET", summary="This API's OpenAPI 3 document", scope=None,
       public=True, responses={"200": json_response("the document", {"type": "object"})})
def openapi_document():
    # The app's own area blueprints, in registration order (nested: "api.<area>").
    areas = [bp for bp in current_app.blueprints.values() if isinstance(bp, ApiBlueprint)]
    kinds = [k for k, spec in current_app.extensions["idvault"].jobs.registry.items()
             if not spec.trusted_params]
    return jsonify(build_document(areas, job_kinds=sorted(kinds)))


@bp.op("/health", "GET", summary="Liveness: the server answers (no authentication)",
       scope=None, public=True,
       responses={"200": json_response("the server is up", ref("Health"))})
def health():
    return jsonify({"status": "ok"})


@bp.op("/me", "GET", summary="The caller: its owner, how it authenticated, its scopes",
       scope=None, responses={"200": json_response("the caller", ref("Me"))},
       description="Any valid API key or session; a session may have no owner yet.")
def me():
    return jsonify(require(None, owner=False).to_json())
