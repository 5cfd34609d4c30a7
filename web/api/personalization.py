"""Personalisation over HTTP: photos in, a ``celeb_basis`` or ``lidb`` fitting job out.

``POST /identities/{owner}/{name}/personalize`` is ``idvault personalize``
for API clients. The fit trains on photos, which the vault otherwise never
keeps, and runs later on the job worker; so the endpoint checks the photos
and the identity's consent now, stages the photos sealed under the
identity's own key (:mod:`vault.staged_photos`) and queues the job with a
reference to the stage. The params it builds name no server path: the base
model is a folder of the server's models folder, chosen by name. The stage
is discarded when the job ends, however it ends, and with the identity when
it is erased.

The generic ``POST /jobs`` refuses these kinds (their CLI form takes file
paths); this is their only door from the network.
"""

from __future__ import annotations

from pathlib import Path

from flask import jsonify, request

import encoders.fitting.jobs as personalize
from vault import identities, staged_photos
from vault.errors import InvalidInput
from web.api.blueprint import HANDLE_PARAMS, ApiBlueprint, json_response, ref, state
from web.api.enrollment import PHOTOS_SCHEMA, check_decodable, multipart, read_photos
from web.auth import handle_in_owner, require
from web.errors import Unprocessable

bp = ApiBlueprint("personalization", __name__, tag="personalization")

MAX_STEPS = 2000  # celeb_basis's official 400 with room; bounds one request's GPU time
FORM = {"kind", "base_model", "steps", "seed", "mode", "csrf_token"}


def base_models(models_dir: Path | None) -> list[str]:
    """The diffusers pipelines directly inside the server's models folder, by name."""
    if models_dir is None or not Path(models_dir).is_dir():
        return []
    return sorted(p.name for p in Path(models_dir).iterdir()
                  if (p / "model_index.json").is_file()
                  and personalize.MODEL_NAME.match(p.name))


def _int_field(name: str, lo: int, hi: int) -> int | None:
    raw = request.form.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise InvalidInput(f"'{name}' must be an integer from {lo} to {hi}")
    return int(raw)


def _base_model(raw: str | None) -> str:
    available = base_models(state().config.models_dir)
    if not available and state().jobs.dispatch is not None:
        # A scale-out API node without the models: the worker checks the name.
        if not raw or not personalize.MODEL_NAME.match(raw):
            raise InvalidInput("name the base model in 'base_model': a folder of the "
                               "workers' models folder")
        return raw
    if not available:
        raise Unprocessable("this server has no diffusers base model in its models folder "
                           "(IDVAULT_MODELS) to fit against")
    if raw is None or raw == "":
        if len(available) > 1:
            raise InvalidInput("several base models are installed; name one in 'base_model' "
                               f"({', '.join(available)})")
        return available[0]
    if raw not in available:
        raise InvalidInput(f"no base model {raw[:100]!r} on this server (installed: "
                           f"{', '.join(available)})")
    return raw


def parse_form() -> tuple[str, dict]:
    """The job kind and params (without the photos) from the request's form fields."""
    kind = request.form.get("kind")
    if kind not in personalize.JOB_KINDS:
        raise InvalidInput(f"'kind' must be one of {', '.join(personalize.JOB_KINDS)}")
    params: dict = {"base_model": _base_model(request.form.get("base_model")),
                    "seed": _int_field("seed", 0, 2**31 - 1) or 0}
    steps = _int_field("steps", 1, MAX_STEPS)
    if steps is not None:
        params["steps"] = steps
    mode = request.form.get("mode")
    if mode:
        if kind != "lidb" or mode not in personalize.LIDB_MODES:
            raise InvalidInput(f"'mode' is for lidb only: one of "
                               f"{', '.join(personalize.LIDB_MODES)}")
        params["mode"] = mode
    return kind, params


def queue_fit(p, handle: str, kind: str, params: dict, photos: list[bytes],
              names: list[str]) -> dict:
    """Check the identity (consent, not held) and the photos, stage the photos, queue the
    job; the job (a dict).

    Shared by the API and the identity page; on any failure nothing stays
    staged and nothing is queued.
    """
    st = state()
    with st.vault.session(read_only=True) as s:
        identities.check_usable(identities.get_identity(s, handle), "personalize")
    check_decodable(photos, names)
    staged = staged_photos.stage(st.vault, handle, photos, names=names, actor=p.actor)
    try:
        return st.jobs.submit(p.owner, kind, {**params, "staged": staged.to_json()},
                              identity=handle, actor=p.actor)
    except BaseException:
        with st.vault.session(read_only=True) as s:
            uid = identities.get_identity(s, handle).uid
        staged_photos.discard(st.vault, uid, staged.id)
        raise


@bp.op("/identities/<owner>/<name>/personalize", "POST",
       summary="Fit a Celeb Basis or LiDB artifact for an identity from photos (a job)",
       scope="generate", path_params=HANDLE_PARAMS,
       description="Checks the photos and the identity's consent (`personalize`) now, "
                   "stages the photos sealed under the identity's key, and queues a "
                   "`celeb_basis` or `lidb` job; poll `GET /jobs/{job_id}`. The staged "
                   "photos are deleted when the job ends.",
       body={"required": True, "content": {"multipart/form-data": {"schema": {
           "type": "object", "required": ["kind", "photos"],
           "properties": {
               "kind": {"type": "string", "enum": list(personalize.JOB_KINDS),
                        "description": "celeb_basis: Celeb Basis coefficients; lidb: "
                                       "HyperDreamBooth LiDB weights"},
               "photos": PHOTOS_SCHEMA,
               "base_model": {"type": "string", "maxLength": 100, "description":
                              "a diffusers folder of the server's models folder (default: "
                              "the only one installed)"},
               "steps": {"type": "integer", "minimum": 1, "maximum": MAX_STEPS,
                         "description": "optimisation steps (default: celeb_basis 400; "
                                        "lidb fast 40, scratch 400)"},
               "seed": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
               "mode": {"type": "string", "enum": list(personalize.LIDB_MODES),
                        "description": "lidb only (default fast)"}}}}}},
       responses={
           "202": json_response("queued", ref("Job")),
           "403": json_response("the identity's consent does not grant personalize",
                                ref("Error")),
           "409": json_response("the identity is held for review", ref("Error")),
           "422": json_response("photos rejected (details.photos: one result per photo)",
                                ref("Error"))})
def submit_personalization(owner: str, name: str):
    p = require("generate")
    handle = handle_in_owner(p, owner, name)
    multipart(FORM, {"photos"})
    kind, params = parse_form()
    photos, names = read_photos()
    return jsonify(queue_fit(p, handle, kind, params, photos, names)), 202
