"""The ``enroll`` job kind: photos staged sealed by an API node, enrolled on a worker.

In a scale-out deployment the API nodes run no models. An enrollment request
there checks what it can without them (handle, consent, kinds, that each photo
decodes), seals the photos under the identity's data key
(:mod:`vault.staged_photos`; a new identity's key and uid are made first) and
queues this job; a worker analyses the faces, computes the artifacts and
stores the enrollment (:class:`encoders.enrollment.Enroller`), marking the job
done in the enrollment's own transaction. The stage is discarded when the
job ends, however it ends; a new identity whose enrollment failed leaves no
data key behind.

The same job adds kinds to an enrolled identity from staged photos
(``mode: "add_kinds"``, :mod:`encoders.enrollment_kinds`): the photos are
checked against the identity's face and used for the kinds, never added to it.

Queues: ``gpu`` when a kind runs a torch encoder (:data:`GPU_KINDS`: PhotoMaker,
StoryMaker, and FaceID's CLIP ViT-H/14 tower), else ``cpu``: ``face`` and
``instantid`` run only the ONNX face models (InstantID's antelopev2 pack), which a
CPU worker runs at enrollment speed.

Importing this module registers the kind; it imports no ML library until a job
runs, so an API node can import it for the kind's name, checks and queue.
"""

from __future__ import annotations

import threading

from sqlalchemy import select

from vault import staged_photos
from vault.artifact_kinds import ENROLL_KINDS
from vault.consent import ConsentRequest
from vault.errors import InvalidInput
from vault.jobs import JobContext, JobKind, register_kind
from vault.models import Identity

KIND = "enroll"
GPU_KINDS = ("photomaker", "storymaker", "faceid")  # their encoders run on a GPU worker
PARAMS = ("handle", "staged", "uid", "consent", "kinds", "pick", "mode", "replace")
MODES = ("enroll", "add_kinds")

_enrollers: dict[tuple, object] = {}
_enrollers_lock = threading.Lock()


def validate(params: dict) -> dict:
    """Check an enroll job's params (built by the enrollment endpoint, never by hand)."""
    from vault.handles import Handle

    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise InvalidInput(f"unknown enroll param(s): {', '.join(map(str, unknown))}")
    out = {"handle": str(Handle.parse(str(params.get("handle", "")))),
           "staged": staged_photos.StagedRef.from_json(params.get("staged")).to_json()}
    mode = params.get("mode", "enroll")
    if mode not in MODES:
        raise InvalidInput(f"'mode' must be one of {', '.join(MODES)}")
    kinds = params.get("kinds", ["face"])
    if mode == "add_kinds":
        from encoders.enrollment_kinds import parse_kinds

        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise InvalidInput("'kinds' must be a list of kind names")
        out["kinds"] = parse_kinds(kinds)
        if "uid" in params or "consent" in params:
            raise InvalidInput("adding kinds is for an enrolled identity (no uid or consent)")
        if not isinstance(params.get("replace", False), bool):
            raise InvalidInput("'replace' must be true or false")
        out |= {"mode": mode, "replace": params.get("replace", False)}
    elif (not isinstance(kinds, list) or "face" not in kinds
            or any(k not in ENROLL_KINDS for k in kinds)):
        raise InvalidInput(f"'kinds' must list 'face' and any of {', '.join(ENROLL_KINDS)}")
    elif "replace" in params:
        raise InvalidInput("'replace' goes with mode 'add_kinds'")
    else:
        out["kinds"] = list(dict.fromkeys(kinds))
    pick = params.get("pick")
    if pick is not None and pick != "largest" and not (
            isinstance(pick, int) and not isinstance(pick, bool) and 0 <= pick < 64):
        raise InvalidInput("'pick' must be 'largest' or a face index 0-63")
    out["pick"] = pick
    if "uid" in params or "consent" in params:  # a new identity: both, or neither
        if staged_photos.staged_uid(params) is None or not isinstance(
                params.get("consent"), dict):
            raise InvalidInput("a new identity's enrollment names its uid and consent")
        ConsentRequest.from_dict(params["consent"])  # refuses an invalid record now
        out["uid"], out["consent"] = staged_photos.staged_uid(params), params["consent"]
    return out


def queue(params: dict) -> str:
    return "gpu" if set(params.get("kinds", ())) & set(GPU_KINDS) else "cpu"


def enroller(vault, models_dir):
    """This process's enroller for the vault and models folder, loaded once (the face
    models, and the PhotoMaker / StoryMaker encoders on first use)."""
    key = (id(vault), str(models_dir))
    with _enrollers_lock:
        found = _enrollers.get(key)
        if found is None:
            from encoders.enrollment import Enroller
            from encoders.face.analyzer import FaceAnalyzer

            found = Enroller(vault, FaceAnalyzer.from_models_dir(models_dir),
                             models_dir=models_dir)
            _enrollers.clear()  # one vault per worker process
            _enrollers[key] = found
        return found


def run(ctx: JobContext) -> dict | None:
    p = validate(ctx.params)
    uid = p.get("uid")
    ref = staged_photos.StagedRef.from_json(p["staged"])
    try:
        photos = staged_photos.load(ctx.vault, p["handle"], ref, uid=uid)
        ctx.progress(0.05, "loading the face models")
        flow = enroller(ctx.vault, getattr(ctx.queue, "models_dir", None))

        def progress(stage: str, done: int, total: int) -> None:
            ctx.progress(0.1 + 0.8 * done / max(total, 1), f"{stage}: {done} of {total}")

        if p.get("mode") == "add_kinds":
            from encoders.enrollment_kinds import add_kinds

            add_kinds(flow, p["handle"], p["kinds"], [b for _, b in photos],
                      names=[n for n, _ in photos], pick=p["pick"], replace=p["replace"],
                      progress=progress, actor=f"job:{ctx.job_id}",
                      finish=lambda s, report: ctx.finish(s, report.to_json()))
            return None
        flow.enroll(p["handle"], [b for _, b in photos], names=[n for n, _ in photos],
                    consent=ConsentRequest.from_dict(p["consent"]) if uid else None,
                    kinds=p["kinds"], pick=p["pick"], progress=progress,
                    actor=f"job:{ctx.job_id}", uid=uid,
                    finish=lambda s, report: ctx.finish(s, report.to_json()))
    except BaseException:
        if uid is not None:
            forget_new_identity(ctx.vault, uid)
        raise
    return None  # done, with its result, in the enrollment's transaction


def forget_new_identity(vault, uid: str) -> None:
    """After a failed enrollment of a new identity: its data key and staged photos go,
    unless the identity exists after all (the enrollment committed)."""
    with vault.session(read_only=True) as s:
        if s.scalar(select(Identity.id).where(Identity.uid == uid)) is not None:
            return
    vault.keys.shred(uid)
    staged_photos.discard_identity(vault, uid)


register_kind(JobKind(
    KIND, run, scope="identities:write", validate=validate, trusted_params=True,
    queue=queue, time_limit=1800.0,
    description="enroll photos an API node staged: faces found and embedded, deduplicated, "
                "the artifacts asked for computed (POST /v1/identities/{owner}/{name}/enroll "
                "on a scale-out deployment); or, mode add_kinds, kinds added to an enrolled "
                "identity from staged photos checked against it (POST .../kinds)"),
    replace=True)
