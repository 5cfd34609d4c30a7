"""The ``generate`` job kind: a scene from identity handles, run by the job worker.

Importing this module registers the kind with :mod:`vault.jobs` (the web API
imports it, so ``idvault serve`` runs generations on its embedded worker).
The worker loads one :class:`generators.compose.ComposePipeline` per vault
and models folder on first use (the base model is the first SDXL folder in
the models folder, e.g. ``sdxl-tiny`` of ``idvault models tiny``) and keeps
it for the next jobs.

The signed PNG is written to ``DATA_DIR/outputs/<job id>.png``
(:mod:`vault.generated_images`); the job's result holds that path (relative
to the data dir), its SHA-256, the size, seed, handles and methods -- never
decrypted identity data, which stays in memory for the length of the call.
Erasing an identity removes every stored image that shows it (the job keeps
its record, with ``image_removed``). An identity erased, or its consent
withdrawn, while its scene is being made fails the job and leaves no image:
the image, the ``generate`` audit events and the job's completion commit in
one transaction, under the owner's lock, after the identities are checked
again. So a job delivered twice (a scale-out worker died) makes one image and
one set of events.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

from vault import dedupe_log, identities
from vault.errors import InvalidInput, ModelUnavailable, NotFound
from vault.generated_images import image_path
from vault.jobs import JobContext, JobKind, register_kind
from vault.private_files import private_dir
from web.errors import Unprocessable

log = logging.getLogger(__name__)

KIND = "generate"
MAX_PROMPT = 2000
MAX_STEPS = 100
MAX_SIDE = 2048
MAX_PIPELINES = 2
# The identity methods of generators.methods.METHODS (a test keeps the two equal), named
# here so that an API node can check a request without importing the ML stack.
METHOD_CHOICES = ("auto", "photomaker", "storymaker", "faceid", "instantid", "celeb_basis",
                  "lidb")
MAX_METHODS = 16  # per-identity method choices in one request
PARAMS = ("prompt", "layout", "seed", "steps", "size", "method", "commercial")

_pipes: dict[tuple, object] = {}
_pipes_lock = threading.Lock()


def _int(params: dict, key: str, default: int, lo: int, hi: int) -> int:
    value = _integral(params.get(key, default))
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidInput(f"'{key}' must be an integer from {lo} to {hi}")
    return value


def _integral(value: object) -> object:
    """JSON Schema counts 30.0 as an integer, as the API's document says; so do we."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def validate(params: dict) -> dict:
    """Check and normalise a generate job's params (InvalidInput names what is wrong)."""
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise InvalidInput(f"unknown generate param(s): {', '.join(map(str, unknown))} "
                           f"(params: {', '.join(PARAMS)})", fields=unknown)
    prompt = params.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT:
        raise InvalidInput(f"'prompt' must be a string of 1 to {MAX_PROMPT} characters")
    out: dict = {"prompt": prompt, "seed": _int(params, "seed", 0, 0, 2**32 - 1),
                 "steps": _int(params, "steps", 30, 1, MAX_STEPS)}
    layout = params.get("layout")
    if layout is not None:
        if not isinstance(layout, str) or len(layout) > 2000:
            raise InvalidInput("'layout' must be a string of at most 2000 characters "
                               "(e.g. '@smiths/ana=0,0,0.5,1;@smiths/ben=0.5,0,1,1')")
        if layout.strip():
            out["layout"] = layout
    size = params.get("size")
    if size is not None:
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(_integral(v), int) and not isinstance(v, bool)
                           for v in size)
                or not all(8 <= v <= MAX_SIDE and v % 8 == 0 for v in size)):
            raise InvalidInput(f"'size' must be [width, height], multiples of 8 from 8 to "
                               f"{MAX_SIDE}")
        out["size"] = [int(v) for v in size]
    out["method"] = _method(params.get("method", "auto"))
    commercial = params.get("commercial", False)
    if not isinstance(commercial, bool):
        raise InvalidInput("'commercial' must be true or false")
    out["commercial"] = commercial
    return out


def _method(method: object) -> str | dict[str, str]:
    """``auto``, one method name, or an object mapping handles to method names."""
    if isinstance(method, str) and method in METHOD_CHOICES:
        return method
    if (isinstance(method, dict) and 0 < len(method) <= MAX_METHODS
            and all(isinstance(k, str) and 0 < len(k) <= 80 and v in METHOD_CHOICES
                    for k, v in method.items())):
        return {k.lstrip("@"): v for k, v in method.items()}
    raise InvalidInput(f"'method' must be one of {', '.join(METHOD_CHOICES)}, or an object "
                       "mapping each identity's handle to one of them, e.g. {\"@smiths/ana\": "
                       "\"faceid\", \"@smiths/ben\": \"instantid\"}")


def preflight(vault, owner: str, params: dict) -> None:
    """Refuse at submission a scene that cannot run: a bad mention, a handle of another
    owner or unknown (the same NotFound), a held identity, consent that does not grant
    ``generate`` (and ``commercial`` when asked), an identity without an artifact its
    method reads (422). The checks of ``idvault generate`` (:mod:`generators.preflight`;
    no model, no torch); the job checks again when it runs."""
    from generators.preflight import check_artifacts
    from generators.prompt import parse_prompt, resolve_identities

    purposes = ("generate", "commercial") if params.get("commercial") else ("generate",)
    parsed = parse_prompt(params["prompt"])
    method = params.get("method", "auto")
    if isinstance(method, dict):
        extra = sorted(set(method) - set(parsed.handles))
        if extra:
            raise Unprocessable(f"'method' names identities the prompt does not mention: "
                                f"{', '.join('@' + h for h in extra)}")
    resolved = resolve_identities(vault, parsed, owner=owner, purposes=purposes)
    try:
        check_artifacts(resolved, method)
    except InvalidInput as exc:  # a well-formed request this vault cannot carry out
        raise Unprocessable(exc.message, **exc.details) from None


def local_preflight(queue, params: dict) -> None:
    """Where this process runs the job itself: the SDXL base model its pipeline loads is
    in the models folder. If not, refused at submission (422: this server cannot carry
    it out), not a job that fails later; the client is told what the operator should
    do, the log gets the folder searched."""
    from generators.base_model import find_base_model

    try:
        find_base_model(None, getattr(queue, "models_dir", None))
    except ModelUnavailable as exc:
        log.warning("generate refused: %s", exc)
        raise Unprocessable(
            "this server has no SDXL base model to generate with; the operator should put "
            "one in its models folder (docs/models.md; `idvault models tiny DIR` for an "
            "offline stand-in)") from None


def stored_image(vault, job: dict) -> Path:
    """The PNG of a finished generate job (NotFound when there is none)."""
    result = job.get("result") or {}
    removed = result.get("image_removed")
    if job.get("kind") == KIND and isinstance(removed, dict):
        raise NotFound(f"the image of job {job.get('id')} was removed on "
                       f"{removed.get('at')}: {removed.get('reason')}")
    if job.get("kind") != KIND or job.get("status") != "done" or not result.get("image"):
        raise NotFound(f"job {job.get('id')} has no generated image")
    path = image_path(vault.settings.data_dir, job["id"])
    if not path.is_file():
        raise NotFound(f"the image of job {job['id']} is no longer stored")
    return path


def pipeline(vault, models_dir):
    """The pipeline of this vault and models folder, loaded once."""
    from generators.compose import ComposePipeline

    key = (id(vault), str(models_dir))
    with _pipes_lock:
        pipe = _pipes.get(key)
        if pipe is None:
            pipe = ComposePipeline.from_pretrained(None, vault=vault, models_dir=models_dir)
            while len(_pipes) >= MAX_PIPELINES:  # one per process in practice; tests open many
                _pipes.pop(next(iter(_pipes)))
            _pipes[key] = pipe
        return pipe


def run(ctx: JobContext) -> None:
    p = validate(ctx.params)
    ctx.progress(0.0, "loading the models")
    pipe = pipeline(ctx.vault, getattr(ctx.queue, "models_dir", None))
    ctx.progress(0.02, "composing")
    started = time.perf_counter()
    data_dir = Path(ctx.vault.settings.data_dir)
    path = image_path(data_dir, ctx.job_id)

    def progress(done: int, total: int) -> None:
        ctx.progress(0.02 + 0.96 * done / max(total, 1), f"denoising: step {done} of {total}")

    def finish(s, result) -> None:
        # In the transaction of the generation's audit events: the image, the events and
        # the job's "done" commit together. Under the owner's lock, which an erasure
        # takes too, the identities are checked again: one erased or withdrawn while the
        # scene was made fails the job, and an erasure after this commit finds the job
        # done and removes its image (vault.generated_images).
        with ctx.vault.session(read_only=True) as r:
            owner_id = identities.get_owner(r, ctx.owner).id
        dedupe_log.lock_owner(s, owner_id)
        preflight(ctx.vault, ctx.owner, p)
        private_dir(path.parent)
        manifest = result.save(path)  # written beside it and renamed into place
        width, height = result.image.size
        ctx.finish(s, {
            "image": str(path.relative_to(data_dir)),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "bytes": path.stat().st_size, "width": width, "height": height,
            "seed": p["seed"], "steps": p["steps"],
            "identities": [i.get("handle") for i in manifest.get("identities", [])],
            "methods": dict(result.methods),
            "seconds": round(time.perf_counter() - started, 3),
            "generation_id": result.generation_id})

    size = tuple(p["size"]) if "size" in p else None
    try:
        pipe(p["prompt"], owner=ctx.owner, actor=f"job:{ctx.job_id}", layout=p.get("layout"),
             seed=p["seed"], steps=p["steps"], size=size, method=p["method"],
             commercial=p["commercial"], progress=progress, finish=finish)
    except BaseException:
        path.unlink(missing_ok=True)  # nothing committed: no image either
        raise


register_kind(JobKind(
    KIND, run, scope="generate", validate=validate, preflight=preflight,
    local_preflight=local_preflight, queue="gpu",
    time_limit=3600.0,
    description="compose a scene of enrolled identities from a prompt with @handles "
                "(signed PNG with provenance; GET /v1/jobs/{id}/image)"), replace=True)
