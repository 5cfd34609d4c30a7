"""Artifacts: metadata, decrypted downloads (``artifacts:read``; consent permitting;
audited) and exports in the formats other tools load."""

from __future__ import annotations

import re
from pathlib import Path

from flask import Response, jsonify, request

from vault.errors import InvalidInput, NotFound
from web.api.blueprint import (
    HANDLE_PARAMS,
    ApiBlueprint,
    choice_arg,
    items_of,
    json_response,
    query_param,
    ref,
    state,
)
from web.auth import handle_in_owner, require

bp = ApiBlueprint("artifacts", __name__, tag="artifacts")

READ_PURPOSES = ("share", "generate", "personalize")
ARTIFACT_PARAMS = {**HANDLE_PARAMS, "artifact_id": {"type": "string", "maxLength": 64}}
BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
EXPORT_FORMATS = ("photomaker", "textual_inversion", "diffusers_lora", "reactor",
                  "ip_adapter_embeds")
MODEL_ID = query_param("model_id", {"type": "string", "maxLength": 128},
                       "which one, when the identity has several of that kind")
BASE_MODEL = query_param("base_model", {"type": "string", "maxLength": 128},
                         "diffusers_lora only: the base model's folder name inside the "
                         "server's models folder")


def _artifact(handle: str, artifact_id: str) -> dict:
    for a in state().vault.describe(handle)["artifacts"]:
        if a["id"] == artifact_id:
            return a
    raise NotFound(f"{handle} has no artifact {artifact_id}")


def _filename(handle: str, what: str) -> str:
    return f"{handle.replace('/', '-')}-{what}.safetensors"


def _binary(payload: bytes, filename: str, sha256: str | None = None) -> Response:
    resp = Response(payload, mimetype="application/octet-stream")
    resp.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    if sha256:
        resp.headers["X-Content-SHA256"] = sha256
    return resp


@bp.op("/identities/<owner>/<name>/artifacts", "GET", summary="The identity's artifacts "
       "(metadata only: kind, model id, size, SHA-256, shapes)", scope="identities:read",
       path_params=HANDLE_PARAMS,
       responses={"200": json_response("artifact metadata", items_of("Artifact"))})
def list_artifacts(owner: str, name: str):
    p = require("identities:read")
    return jsonify({"items": state().vault.describe(handle_in_owner(p, owner, name))
                    ["artifacts"]})


@bp.op("/identities/<owner>/<name>/artifacts/<artifact_id>", "GET",
       summary="One artifact's metadata", scope="identities:read", path_params=ARTIFACT_PARAMS,
       responses={"200": json_response("artifact metadata", ref("Artifact"))})
def get_artifact(owner: str, name: str, artifact_id: str):
    p = require("identities:read")
    return jsonify(_artifact(handle_in_owner(p, owner, name), artifact_id))


@bp.op("/identities/<owner>/<name>/artifacts/<artifact_id>/payload", "GET",
       summary="The decrypted artifact (safetensors); consent must grant the purpose; audited",
       scope="artifacts:read", path_params=ARTIFACT_PARAMS,
       query=[query_param("purpose", {"type": "string", "enum": list(READ_PURPOSES)},
                          "why it is read (default share); consent must grant it")],
       responses={"200": {"description": "the safetensors payload", "content": BINARY}})
def download_artifact(owner: str, name: str, artifact_id: str):
    p = require("artifacts:read")
    handle = handle_in_owner(p, owner, name)
    purpose = choice_arg("purpose", READ_PURPOSES, "share")
    meta = _artifact(handle, artifact_id)
    opened = state().vault.get_artifact(handle, meta["kind"], model_id=meta["model_id"],
                                        purpose=purpose, actor=p.actor)
    return _binary(opened.payload, _filename(handle, meta["kind"]), meta["sha256"])


@bp.op("/identities/<owner>/<name>/exports/<export_format>", "GET",
       summary="Export for other tools: photomaker (ID embeddings), textual_inversion "
               "(Celeb Basis), diffusers_lora (LiDB; needs base_model), reactor (a ReActor "
               "face model), ip_adapter_embeds (FaceID Plus v2 for diffusers)",
       scope="artifacts:read",
       path_params={**HANDLE_PARAMS, "export_format": {"type": "string", "maxLength": 32}},
       query=[MODEL_ID, BASE_MODEL],
       responses={"200": {"description": "a safetensors file", "content": BINARY}})
def export(owner: str, name: str, export_format: str):
    from encoders.fitting import exports

    p = require("artifacts:read")
    handle = handle_in_owner(p, owner, name)
    if export_format not in EXPORT_FORMATS:
        raise NotFound(f"no export format {export_format!r} (formats: "
                       f"{', '.join(EXPORT_FORMATS)})")
    model_id = request.args.get("model_id")
    if model_id is not None and len(model_id) > 128:
        raise InvalidInput("'model_id' is at most 128 characters")
    result = exports.export(state().vault, handle, export_format, model_id=model_id,
                            base_model=_base_model_folder(request.args.get("base_model")),
                            actor=p.actor)
    return _binary(result.data, _filename(handle, result.filename_suffix))


def _base_model_folder(name: str | None) -> Path | None:
    """A base model named by its folder directly inside the models folder."""
    if name is None:
        return None
    models = state().config.models_dir
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name) or models is None:
        raise InvalidInput("'base_model' names a folder inside the server's models folder "
                           "(letters, digits, '.', '_', '-')")
    folder = Path(models) / name
    if not (folder / "model_index.json").is_file():
        raise NotFound(f"no diffusers pipeline {name!r} in the server's models folder")
    return folder
