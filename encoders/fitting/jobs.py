"""The ``celeb_basis`` and ``lidb`` job kinds: fit an identity's artifact as a
resumable job (:mod:`vault.jobs`), registered when this module is imported.

The fitting itself is :mod:`encoders.fitting.core` with
:mod:`encoders.fitting.celeb_basis` or :mod:`encoders.fitting.lidb`; this
module gets the photos and base model of a job, checks consent, keeps the fit
state sealed between checkpoints and seals the result into the vault. It imports
the ML stack only when a job runs, so a process that only submits jobs (the web
app) can import it for the kinds' names and checks.

**Photos.** The vault never stores photos, only what encoders computed from
them. A fit needs images, so they come with the job, one of two ways (job
params are plain JSON, never pixels):

* ``params["photos"]``: paths readable by the worker, from trusted callers
  only (``idvault personalize`` on the machine that runs the job);
* ``params["staged"]``: photos uploaded over the API and staged sealed
  under the identity's key (:mod:`vault.staged_photos`); such a job names
  its ``base_model`` as a folder *inside the worker's models folder*, never a
  path, and the stage is discarded when the job ends.

Both kinds are registered with ``trusted_params``, so the generic
``POST /v1/jobs`` refuses them; the web API's personalise endpoint stages
the upload and builds the params itself. The face *embedding* the Celeb
Basis mapper reads is the identity's stored ``face`` artifact (its
L2-normalised ``mean``).

**Checkpoints.** ``vault.jobs`` checkpoints are plain JSON and must never hold
biometric data; fitted weights are derived from a face. So the fit state
(weights, optimiser, EMA, generator state) is written to a file under
``<data dir>/jobs/`` **sealed with the identity's own data key** (so erasing
the identity crypto-shreds it too), and the JSON checkpoint holds only the
step, the file name and its SHA-256. The file is deleted when the job ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from encoders.base_model_id import base_model_id
from vault.private_files import private_dir, write_private

if TYPE_CHECKING:
    from encoders.fitting.core import FitConfig

JOB_KINDS = ("celeb_basis", "lidb")
LIDB_MODES = ("fast", "scratch")
HYPERNETWORK_FILE = "lidb_hypernetwork.safetensors"
# A fit resumes from its checkpoints; one run may take this long (Celeb Basis' 400 steps
# took hours on 2 CPU cores, minutes on a GPU).
FIT_TIME_LIMIT = 12 * 3600.0
# A folder name inside the models folder: no separators, no leading dot.
MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


def _validate(kind: str) -> Callable[[dict], dict]:
    def check(params: dict) -> dict:
        from vault.errors import InvalidInput
        from vault.staged_photos import StagedRef

        known = {"photos", "staged", "base_model", "steps", "seed", "lr", "face_model_id",
                 "checkpoint_every", "models_dir", "mode", "rank", "basis_id", "resolution"}
        extra = sorted(set(params) - known)
        if extra:
            raise InvalidInput(f"unknown {kind} job params: {', '.join(extra)}")
        out = dict(params)
        if "staged" in params:
            if "photos" in params or "models_dir" in params:
                raise InvalidInput(f"a {kind} job with staged photos takes neither 'photos' "
                                   "nor 'models_dir' (the worker's models folder is used)")
            out["staged"] = StagedRef.from_json(params["staged"]).to_json()
            name = params.get("base_model")
            if not isinstance(name, str) or not MODEL_NAME.match(name):
                raise InvalidInput(f"a {kind} job with staged photos names 'base_model' as a "
                                   "folder inside the worker's models folder (a name, not a "
                                   "path)")
        else:
            photos = params.get("photos")
            if not isinstance(photos, list) or not photos or not all(isinstance(p, str)
                                                                      for p in photos):
                raise InvalidInput(f"a {kind} job needs 'photos': a non-empty list of file "
                                   "paths (the vault stores no photos; the fit needs them)")
            if not isinstance(params.get("base_model"), str):
                raise InvalidInput(f"a {kind} job needs 'base_model': a diffusers folder")
        for name, lo in (("steps", 1), ("seed", 0), ("checkpoint_every", 0), ("rank", 1)):
            if name in out and (not isinstance(out[name], int) or out[name] < lo):
                raise InvalidInput(f"'{name}' must be an integer >= {lo}")
        if "lr" in out and not (isinstance(out["lr"], (int, float)) and out["lr"] > 0):
            raise InvalidInput("'lr' must be a positive number")
        if kind == "lidb" and out.get("mode", "fast") not in LIDB_MODES:
            raise InvalidInput(f"'mode' must be one of {', '.join(LIDB_MODES)}")
        return out

    return check


class _SealedCheckpoints:
    """Fit state files sealed with the identity's DEK; the JSON checkpoint names them."""

    def __init__(self, ctx) -> None:
        from vault import identities

        self.ctx = ctx
        self.dir = Path(ctx.vault.settings.data_dir) / "jobs"
        with ctx.vault.session() as s:
            self.identity_uid = identities.get_identity(s, ctx.identity).uid

    def _context(self) -> dict:
        return {"vault": str(self.ctx.vault.vault_id), "job": self.ctx.job_id,
                "identity": self.identity_uid, "purpose": "fit-checkpoint"}

    def save(self, step: int, state: bytes) -> None:
        from vault import crypto

        key_id, dek = self.ctx.vault.keys.get_or_create_dek(self.identity_uid)
        sealed = crypto.seal(dek, state, key_id=key_id, key_version=1, context=self._context())
        private_dir(self.dir)
        path = self.dir / f"{self.ctx.job_id}.ckpt"
        tmp = path.with_suffix(".tmp")
        write_private(tmp, sealed)
        tmp.replace(path)  # atomic: a crash mid-write keeps the previous checkpoint
        self.ctx.save_checkpoint({"step": step, "file": path.name,
                                  "sha256": hashlib.sha256(sealed).hexdigest()})

    def load(self) -> bytes | None:
        from vault import crypto

        cp = self.ctx.checkpoint
        if not cp or "file" not in cp:
            return None
        path = self.dir / cp["file"]
        if not path.exists():
            return None
        sealed = path.read_bytes()
        if hashlib.sha256(sealed).hexdigest() != cp.get("sha256"):
            return None  # a later, unrecorded write: start over rather than trust it
        _, dek = self.ctx.vault.keys.dek(self.identity_uid)
        return crypto.open_token(dek, sealed, context=self._context())

    def clear(self) -> None:
        (self.dir / f"{self.ctx.job_id}.ckpt").unlink(missing_ok=True)

    @contextlib.contextmanager
    def cleared_on_cancel(self) -> Iterator[None]:
        """A cancelled job will not resume: drop its fit state. (A crash keeps it.)"""
        from vault.jobs import JobCancelled

        try:
            yield
        except JobCancelled:
            self.clear()
            raise


def _prepare(ctx):
    """Consent (``personalize``; not held for review), photos and the base model of a job."""
    from encoders.fitting import core
    from vault import identities
    from vault.errors import InvalidInput

    with ctx.vault.session(read_only=True) as s:
        identities.check_usable(identities.get_identity(s, ctx.identity), "personalize")
    p = ctx.params
    if "staged" in p:
        from vault import staged_photos

        sources = staged_photos.load(ctx.vault, ctx.identity,
                                     staged_photos.StagedRef.from_json(p["staged"]))
        base_model = _in_models_dir(ctx, p["base_model"])
    else:
        sources, base_model = p["photos"], Path(p["base_model"])
    try:
        images = core.load_face_images(sources)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    ctx.progress(0.0, f"loading base model {base_model.name}")
    model = core.DiffusionModel.from_pretrained(base_model)
    ctx.progress(0.04, f"loaded base model {base_model.name}")  # a cancel meanwhile lands here
    return model, images, base_model_id(base_model)


def worker_models_dir(ctx) -> Path | None:
    """The models folder of the worker running ``ctx`` (``idvault serve --models``)."""
    folder = getattr(ctx.queue, "models_dir", None)
    return Path(folder) if folder else None


def _in_models_dir(ctx, name: str) -> Path:
    from vault.errors import InvalidInput

    root = worker_models_dir(ctx)
    if root is None:
        raise InvalidInput("this worker has no models folder (IDVAULT_MODELS) to find the "
                           f"base model {name!r} in")
    folder = root / name
    if not MODEL_NAME.match(name) or not (folder / "model_index.json").is_file():
        raise InvalidInput(f"no diffusers base model {name!r} in the worker's models folder")
    return folder


def _fit_config(p: dict, **defaults) -> FitConfig:
    from encoders.fitting.core import FitConfig

    cfg = replace(FitConfig(), **defaults)
    overrides = {k: p[k] for k in ("steps", "seed", "lr", "checkpoint_every", "resolution")
                 if k in p}
    return replace(cfg, **overrides)


# A fit's steps span this part of the job's progress (0..1); loading comes before it.
STEPS_FROM, STEPS_SPAN = 0.05, 0.9


def _progress(ctx, label: str) -> Callable[[int, int, float], None]:
    # Called after every step: ctx.progress raises JobCancelled there, so a cancel lands
    # within a step.
    def update(done: int, total: int, loss: float) -> None:
        ctx.progress(STEPS_FROM + STEPS_SPAN * done / total,
                     f"{label}: step {done}/{total}, loss {loss:.4f}")

    return update


def fit_step(fraction: float, total: int) -> int:
    """The step a fit job of ``total`` steps had reached at progress ``fraction``."""
    return max(0, min(total, round((fraction - STEPS_FROM) / STEPS_SPAN * total)))


def run_celeb_basis_job(ctx) -> None:
    """Fit the identity's Celeb Basis coefficients; seal them as a ``celeb_basis`` artifact."""
    from encoders.fitting import celeb_basis as cb

    model, images, model_id = _prepare(ctx)
    p = ctx.params
    face = ctx.vault.get_artifact(ctx.identity, "face", model_id=p.get("face_model_id"),
                                  purpose="personalize", actor=f"job:{ctx.job_id}")
    import numpy as np
    import torch

    embedding = torch.from_numpy(np.asarray(face.artifact.tensors["mean"], dtype=np.float32))
    with ctx.vault.session() as s:
        basis = (cb.load_basis(s, p["basis_id"]) if "basis_id" in p
                 else cb.ensure_default_basis(s, model))
    cps = _SealedCheckpoints(ctx)
    cfg = _fit_config(p)
    with cps.cleared_on_cancel():
        result = cb.fit_coefficients(model, basis, [embedding[None]], [images], cfg,
                                     resume=cps.load(), save=cps.save,
                                     progress=_progress(ctx, "celeb_basis"))
    payload = cb.coefficients_payload(result.coefficients[0], basis_id=basis.id,
                                      model_id=model_id)
    summary = {"kind": "celeb_basis", "model_id": model_id, "basis_id": basis.id,
               "steps": result.fit.steps, "resumed_from": result.fit.resumed_from,
               "first_loss": result.fit.losses[0] if result.fit.losses else None,
               "last_loss": result.fit.losses[-1] if result.fit.losses else None}
    ctx.vault.put_artifact(ctx.identity, "celeb_basis", payload, actor=f"job:{ctx.job_id}",
                           finish=_done_with(ctx, summary))
    cps.clear()
    return None  # done, with its result, in the artifact's transaction


def _done_with(ctx, summary: dict):
    """Mark the job done in the transaction that stores its artifact: a job delivered
    again after a crash finds it done and stores nothing twice."""

    def finish(s, stored) -> None:
        ctx.finish(s, {"artifact": stored.id, **summary})

    return finish


def run_lidb_job(ctx) -> None:
    """Fit LiDB train factors for the identity; seal them as a ``lidb`` artifact."""
    from encoders.fitting import lidb

    model, images, model_id = _prepare(ctx)
    p = ctx.params
    mode = p.get("mode", "fast")
    rank = int(p.get("rank", lidb.FAST_RANK if mode == "fast" else 1))
    start = None
    models_dir = worker_models_dir(ctx) if "staged" in p else p.get("models_dir")
    hyper = Path(models_dir) / HYPERNETWORK_FILE if models_dir else None
    if mode == "fast" and hyper is not None and hyper.exists():
        ctx.progress(0.02, "predicting LiDB weights with the hypernetwork")
        net = lidb.load_hypernetwork(hyper)
        start = lidb.predict_weights(net, images[0])
    cps = _SealedCheckpoints(ctx)
    defaults = lidb.FAST_FIT if mode == "fast" else lidb.SCRATCH_FIT
    cfg = _fit_config(p, **{k: getattr(defaults, k) for k in ("steps", "lr", "checkpoint_every")})
    with cps.cleared_on_cancel():
        weights, fit = lidb.fit_lidb(model, images, cfg, rank=rank, seed=int(p.get("seed", 0)),
                                     start=start, resume=cps.load(), save=cps.save,
                                     progress=_progress(ctx, f"lidb ({mode})"))
    summary = {"kind": "lidb", "model_id": model_id, "mode": mode, "rank": rank,
               "layers": len(weights.layers), "hypernetwork": start is not None,
               "steps": fit.steps, "resumed_from": fit.resumed_from,
               "first_loss": fit.losses[0] if fit.losses else None,
               "last_loss": fit.losses[-1] if fit.losses else None}
    ctx.vault.put_artifact(ctx.identity, "lidb", weights.payload(model_id=model_id),
                           actor=f"job:{ctx.job_id}", finish=_done_with(ctx, summary))
    cps.clear()
    return None


def register_jobs(*, replace_existing: bool = True) -> None:
    """Register the ``celeb_basis`` and ``lidb`` job kinds with :mod:`vault.jobs`."""
    from vault.jobs import JobKind, register_kind

    register_kind(JobKind(
        "celeb_basis", run_celeb_basis_job, scope="generate", validate=_validate("celeb_basis"),
        needs_identity=True, trusted_params=True, queue="gpu", time_limit=FIT_TIME_LIMIT,
        description="fit Celeb Basis coefficients for an identity (consent: personalize)"),
        replace=replace_existing)
    register_kind(JobKind(
        "lidb", run_lidb_job, scope="generate", validate=_validate("lidb"), needs_identity=True,
        trusted_params=True, queue="gpu", time_limit=FIT_TIME_LIMIT,
        description="fit HyperDreamBooth LiDB weights for an identity (consent: personalize)"),
        replace=replace_existing)


register_jobs()

__all__ = [
    "HYPERNETWORK_FILE",
    "JOB_KINDS",
    "LIDB_MODES",
    "MODEL_NAME",
    "fit_step",
    "register_jobs",
    "run_celeb_basis_job",
    "run_lidb_job",
    "worker_models_dir",
]
