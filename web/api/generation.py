"""Generation over HTTP: submit a scene (a ``generate`` job), fetch its signed PNG, verify
provenance of a stored or uploaded image (``web.generation``)."""

from __future__ import annotations

import io
import struct
import warnings

from flask import jsonify, request, send_file
from PIL import Image

from generators.provenance import verify_image
from vault.errors import InvalidInput
from web import generation
from web.api.blueprint import (
    HANDLE_SCHEMA,
    ApiBlueprint,
    json_body,
    json_request,
    json_response,
    ref,
    state,
)
from web.auth import require
from web.errors import Unprocessable, UnsupportedMediaType

bp = ApiBlueprint("generation", __name__, tag="generation")

JOB_ID = {"job_id": {"type": "string", "maxLength": 64}}
PNG = {"image/png": {"schema": {"type": "string", "format": "binary"}}}
MAX_VERIFY_BYTES = 32 * 1024 * 1024
MAX_VERIFY_PIXELS = 4096 * 4096  # generated images are at most 2048x2048

GENERATE_BODY = {
    "type": "object", "required": ["prompt"], "additionalProperties": False,
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": generation.MAX_PROMPT,
                   "description": "the scene, with identities as @owner/name (optionally "
                                  "@owner/name:classword)"},
        "layout": {"type": "string", "maxLength": 2000, "description":
                   "boxes per identity, fractions x0,y0,x1,y1: 'ana=0,0,0.5,1;ben=0.5,0,1,1' "
                   "(default: strips in order of mention)"},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
        "steps": {"type": "integer", "minimum": 1, "maximum": generation.MAX_STEPS},
        "size": {"type": "array", "minItems": 2, "maxItems": 2, "description":
                 "[width, height] (default: the base model's)",
                 "items": {"type": "integer", "minimum": 8, "maximum": generation.MAX_SIDE,
                           "multipleOf": 8}},
        "method": {"oneOf": [
            {"type": "string", "enum": list(generation.METHOD_CHOICES)},
            {"type": "object", "minProperties": 1, "maxProperties": generation.MAX_METHODS,
             "propertyNames": HANDLE_SCHEMA,
             "additionalProperties": {"type": "string",
                                      "enum": list(generation.METHOD_CHOICES)}}],
                   "description": "auto (default), one method for every identity, or an "
                                  "object mapping each identity's handle to its method "
                                  "(mix methods in one image)"},
        "commercial": {"type": "boolean", "description": "needs the 'commercial' consent "
                       "purpose of every identity"}}}


def _check_pixels(data: bytes) -> None:
    """Refuse images too large to be ours before decoding them (decompression bombs)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"the image is too large to be a generated image: {exc}") from None
    except Exception:
        return
    if width * height > MAX_VERIFY_PIXELS:
        raise InvalidInput(f"the image is {width}x{height}: too large to be a generated "
                           f"image (at most {MAX_VERIFY_PIXELS // 1_000_000} megapixels)")


def _verification(v) -> dict:
    return {"status": v.status, "ok": v.ok, "message": v.message, "reason": v.reason,
            "key_id": v.key_id, "manifest": v.manifest, "summary": v.summary()}


@bp.op("/generate", "POST", summary="Compose a scene of the owner's identities (a 'generate' "
       "job)", scope="generate",
       description="Queues a job; poll `GET /jobs/{job_id}`, then fetch "
                   "`GET /jobs/{job_id}/image`. The prompt's identities are checked now (an "
                   "unknown or another owner's handle: 404; held for review: 409; consent "
                   "not granting `generate`, or `commercial` when asked: 403; no artifact "
                   "its method reads, or no base model on a server that runs its jobs: "
                   "422) and again when the job runs, where a refusal fails the job with "
                   "the reason.",
       body=json_request(GENERATE_BODY),
       responses={"202": json_response("queued", ref("Job")),
                  "403": json_response("an identity's consent refuses this use", ref("Error")),
                  "422": json_response("a malformed @mention in the prompt, 'method' names "
                                       "an identity the prompt does not "
                                       "mention, an identity lacks the artifact its "
                                       "method reads, or this server (running its jobs "
                                       "itself) has no base model", ref("Error")),
                  "503": json_response("this server has no generation models (the "
                                       "operator installs them)", ref("Error")),
                  "404": json_response("a handle that is unknown or of another owner",
                                       ref("Error")),
                  "409": json_response("an identity is held for review", ref("Error"))})
def submit_generation():
    p = require("generate")
    doc = json_body(required=("prompt",), optional=generation.PARAMS[1:])
    params = generation.validate(doc)
    try:
        job = state().jobs.submit(p.owner, generation.KIND, params, actor=p.actor)
    except InvalidInput as exc:
        if type(exc) is not InvalidInput or "mention" not in exc.details:
            raise
        # Any text is a prompt by the document; an '@' that starts no handle is its meaning.
        raise Unprocessable(exc.message, **exc.details) from None
    return jsonify(job), 202


@bp.op("/jobs/<job_id>/image", "GET", summary="The signed PNG a generate job made",
       scope="identities:read", path_params=JOB_ID,
       responses={"200": {"description": "the PNG with its provenance manifest",
                          "content": PNG}})
def job_image(job_id: str):
    p = require("identities:read")
    st = state()
    path = generation.stored_image(st.vault, st.jobs.get(job_id, owner=p.owner))
    resp = send_file(path, mimetype="image/png", download_name=f"{job_id}.png",
                     max_age=0, conditional=False)
    resp.headers["Cache-Control"] = "private, no-store"
    return resp


@bp.op("/jobs/<job_id>/verify", "GET", summary="Verify the provenance of a generate job's "
       "stored image", scope="identities:read", path_params=JOB_ID,
       responses={"200": json_response("the verdict", ref("Verification"))})
def verify_job_image(job_id: str):
    p = require("identities:read")
    st = state()
    path = generation.stored_image(st.vault, st.jobs.get(job_id, owner=p.owner))
    return jsonify(_verification(verify_image(st.vault, path)))


@bp.op("/verify", "POST", summary="Verify an uploaded image's provenance against this vault's "
       "signing key", scope="identities:read",
       description="The verdict is one of valid, altered, unknown_signature, no_manifest; "
                   "an image that is not ours or was changed is a 200 with that verdict.",
       body={"required": True, "content": {"multipart/form-data": {"schema": {
           "type": "object", "required": ["image"],
           "properties": {"image": {"type": "string", "format": "binary",
                                    "description": "a PNG (other formats carry no "
                                                   "manifest)"}}}}}},
       responses={"200": json_response("the verdict", ref("Verification")),
                  "422": json_response("the upload is not a readable image", ref("Error"))})
def verify_upload():
    require("identities:read")
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType("send the image as multipart/form-data in the field 'image'")
    unknown = sorted(str(k) for k in (set(request.form) | set(request.files))
                     - {"image", "csrf_token"})
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(unknown)} (fields: image)")
    files = request.files.getlist("image")
    if len(files) != 1:
        raise InvalidInput("send exactly one file in the multipart field 'image'")
    data = files[0].read(MAX_VERIFY_BYTES + 1)
    if not data:
        raise Unprocessable("the image is empty")  # a file part, as the document says
    if len(data) > MAX_VERIFY_BYTES:
        raise InvalidInput(f"the image is larger than {MAX_VERIFY_BYTES} bytes")
    _check_pixels(data)
    try:  # in memory: an upload never reaches a disk (docs/security.md)
        v = verify_image(state().vault, "uploaded.png", data=data)
    except (ValueError, EOFError, struct.error, MemoryError,
            Image.DecompressionBombError) as exc:  # e.g. a decompression bomb
        raise Unprocessable(f"cannot read the upload as an image: {exc}") from None
    except InvalidInput as exc:  # not an image: valid by the document, unreadable (422)
        raise Unprocessable(exc.message) from None
    return jsonify(_verification(v))
