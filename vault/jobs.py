"""Jobs: long work with progress, cancel and resume, over the ``jobs`` table.

A job is a row (``vault.models.Job``): owner, optional identity, ``kind``,
``params``, ``status`` (queued -> running -> done | failed | cancelled),
``progress`` (0..1) and a message, the ``result`` or the ``error``.

Kinds are **pluggable**: a module registers a :class:`JobKind` (its name, the
function that runs it, the API scope needed to submit or cancel it, and an
optional parameter check) with :func:`register_kind`; generation and
personalisation register theirs when they are imported. A worker claims only
the kinds registered in its own process, so GPU workers and API nodes can
share one database.

The embedded default runs jobs on one background thread of the server
process (:meth:`JobQueue.start`). A running job holds a **lease**
(``job_leases``: worker id, attempts, heartbeat, checkpoint) renewed every
few seconds; when a worker dies (the process was killed, the machine
rebooted), its lease goes stale and the job is queued again, up to
``max_attempts`` runs. The function gets back the last checkpoint it saved
(:meth:`JobContext.save_checkpoint`), so it can **resume** where it stopped.

Cancelling a queued job cancels it at once; a running job is asked to stop
and stops at its next :meth:`JobContext.progress` call. Checkpoints,
params and results are stored in plain JSON: they must hold ids, counts and
digests, never biometric data or key material.

Scale-out deployments (a broker URL set) replace the embedded thread by
Celery workers (``web.workers``): :meth:`JobQueue.submit` hands the new job to
``dispatch``, which sends its id to the kind's queue (:attr:`JobKind.queue`:
``gpu`` or ``cpu``), and a worker runs it with :meth:`JobQueue.claim_job` and
:meth:`JobQueue.run_job`. The rows stay the system of record: a job runs only
if its row says it may (queued, or running under a lease that went stale), so
a message delivered twice runs it once. A kind that writes its effects in a
transaction of its own marks the job done in that same transaction
(:meth:`JobContext.finish`), so a crash between the two cannot make it run
again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from vault import identities, staged_photos
from vault.errors import Conflict, InvalidInput, NotFound, VaultError
from vault.handles import Handle
from vault.models import JOB_STATUSES, Identity, Job, JobLease, Owner, utcnow

log = logging.getLogger("idvault.jobs")

MAX_PARAMS_BYTES = 64 * 1024
TERMINAL = ("done", "failed", "cancelled")
SWEEP_EVERY_SECONDS = 600.0
QUEUES = ("gpu", "cpu")  # what a kind needs: a GPU worker (models), or any CPU


class JobCancelled(Exception):
    """Raised inside a job function when the job was cancelled; the worker stops it."""


class JobTimedOut(JobCancelled):
    """Raised inside a job function that ran past its kind's time limit."""


@dataclass(frozen=True)
class JobKind:
    """A kind of job this process can run.

    ``run(ctx)`` does the work and returns the result (a JSON object) or
    None. ``validate(params)`` checks and normalises the submitted params
    (raise ``InvalidInput``). ``scope`` is the API scope needed to submit and
    cancel it; ``needs_identity`` says whether it applies to one identity.
    ``trusted_params``: the params may name things on the worker's machine
    (file paths), so only trusted code builds them -- the CLI, or a web
    endpoint of its own -- and the generic ``POST /v1/jobs`` refuses the kind.
    ``preflight(vault, owner, params)`` checks the params against the vault at
    submission (e.g. that the identities a prompt names are the owner's and
    consent), so a job that cannot run is refused at once; the run checks again.
    ``local_preflight(queue, params)`` checks, at submission, what this process
    needs to run the job itself (e.g. model files); it is skipped when the queue
    dispatches jobs to workers, which hold their own models.
    ``queue`` is where a scale-out deployment runs it: ``gpu`` or ``cpu``, or a
    function of the params saying which. ``time_limit``: seconds a run may take;
    past it the job stops at its next progress report and fails.
    """

    name: str
    run: Callable[[JobContext], dict | None]
    scope: str = "generate"
    description: str = ""
    validate: Callable[[dict], dict] | None = None
    needs_identity: bool = False
    trusted_params: bool = False
    preflight: Callable[[object, str, dict], None] | None = None
    local_preflight: Callable[[object, dict], None] | None = None
    queue: str | Callable[[dict], str] = "cpu"
    time_limit: float = 3600.0

    def queue_for(self, params: dict) -> str:
        name = self.queue(params) if callable(self.queue) else self.queue
        if name not in QUEUES:
            raise ValueError(f"job kind {self.name}: queue {name!r} is not one of {QUEUES}")
        return name


REGISTRY: dict[str, JobKind] = {}


def register_kind(kind: JobKind, *, replace: bool = False) -> JobKind:
    """Make ``kind`` submittable and runnable in this process."""
    if not kind.name or len(kind.name) > 32:
        raise ValueError("a job kind's name is 1 to 32 characters")
    if kind.name in REGISTRY and not replace and REGISTRY[kind.name] is not kind:
        raise ValueError(f"job kind {kind.name!r} is already registered")
    REGISTRY[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    REGISTRY.pop(name, None)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _iso(value: dt.datetime | None) -> str | None:
    return _aware(value).isoformat() if value else None


class JobContext:
    """What a running job sees: its params, checkpoint, progress and cancel."""

    def __init__(self, queue: JobQueue, job: Job, owner: str, identity: str | None,
                 checkpoint: dict | None, attempt: int) -> None:
        self.queue = queue
        self.vault = queue.vault
        self.job_id = job.id
        self.kind = job.kind
        self.owner = owner
        self.identity = identity  # handle, or None
        self.params = dict(job.params or {})
        self.checkpoint = checkpoint
        self.attempt = attempt
        self.deadline: float | None = None  # time.monotonic() past which it must stop

    def finish(self, s: Session, result: dict | None) -> None:
        """Mark the job done with ``result`` in the caller's transaction: the one that
        writes the job's effects, so they commit together or not at all."""
        json.dumps(result)
        job = s.get(Job, self.job_id)
        if job is None:
            raise JobCancelled("the job row is gone")
        job.status, job.finished_at, job.progress, job.result = "done", utcnow(), 1.0, result
        job.error = None

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Record progress (0..1); raises JobCancelled when a cancel was requested, and
        JobTimedOut past the kind's time limit."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        with self.vault.session() as s:
            job = s.get(Job, self.job_id)
            if job is None:
                raise JobCancelled("the job row is gone")
            job.progress = fraction
            if message is not None:
                job.message = message[:2000]
            cancel = job.cancel_requested
            lease = s.get(JobLease, self.job_id)
            if lease is not None:
                lease.heartbeat_at = utcnow()
        if cancel:
            raise JobCancelled("cancel requested")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise JobTimedOut("ran past its time limit")

    def cancelled(self) -> bool:
        with self.vault.session() as s:
            return bool(s.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))

    def save_checkpoint(self, state: dict) -> None:
        """Keep ``state`` (JSON; no biometric data) for a resumed run of this job."""
        json.dumps(state)
        with self.vault.session() as s:
            lease = s.get(JobLease, self.job_id)
            if lease is not None:
                lease.checkpoint = state
                lease.heartbeat_at = utcnow()


class JobQueue:
    """Submit, inspect, cancel and run jobs of one vault."""

    def __init__(self, vault, *, registry: dict[str, JobKind] | None = None,
                 worker_id: str | None = None, lease_seconds: float | None = None,
                 max_attempts: int = 3, poll_seconds: float = 2.0,
                 dispatch: Callable[[str, str, str], None] | None = None) -> None:
        """``dispatch(job_id, kind, queue)`` sends a new job to the workers of a
        scale-out deployment (None: this process runs it, on :meth:`start`'s thread)."""
        self.vault = vault
        self.registry = REGISTRY if registry is None else registry
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease_seconds = (lease_seconds if lease_seconds is not None
                              else vault.settings.job_lease_seconds)
        self.dispatch = dispatch
        self.queues: tuple[str, ...] | None = None  # a worker's queues (None: any)
        self.max_attempts = max_attempts
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: str | None = None

    # -- submitting and reading -----------------------------------------------------------
    def kind(self, name: str) -> JobKind:
        kind = self.registry.get(name) if isinstance(name, str) else None
        if kind is None:
            known = ", ".join(sorted(self.registry)) or "none"
            raise InvalidInput(f"unknown job kind {name!r} (kinds here: {known})")
        return kind

    def submit(self, owner: str, kind: str, params: dict | None = None, *,
               identity: str | None = None, actor: str | None = None) -> dict:
        spec = self.kind(kind)
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise InvalidInput("job params must be a JSON object")
        if spec.validate is not None:
            params = spec.validate(params)
        if len(json.dumps(params)) > MAX_PARAMS_BYTES:
            raise InvalidInput(f"job params are limited to {MAX_PARAMS_BYTES} bytes of JSON")
        if spec.needs_identity and identity is None:
            raise InvalidInput(f"a {kind} job needs an identity")
        if spec.preflight is not None:
            spec.preflight(self.vault, owner, params)
        if spec.local_preflight is not None and self.dispatch is None:
            spec.local_preflight(self, params)
        with self.vault.session() as s:
            owner_row = identities.get_owner(s, owner)
            identity_id = None
            if identity is not None:
                h = Handle.parse(identity)
                if h.owner != owner_row.name:
                    raise NotFound(f"no identity {h}")
                identity_id = identities.get_identity(s, h).id
            job = Job(owner_id=owner_row.id, identity_id=identity_id, kind=kind,
                      status="queued", progress=0.0, params=params,
                      message=f"submitted by {actor}" if actor else None)
            s.add(job)
            s.flush()
            doc = self._describe(s, job)
        self.send(doc["id"], kind, params)
        return doc

    def send(self, job_id: str, kind: str, params: dict) -> bool:
        """Hand a queued job to whoever runs jobs: the workers (``dispatch``) or this
        process's thread. A dispatch that fails leaves the job queued and unsent, for the
        workers' sweep (:meth:`lost`) to send again; False then."""
        if self.dispatch is None:
            self._wake.set()
            return True
        try:
            self.dispatch(job_id, kind, self.kind(kind).queue_for(params))
        except Exception:
            log.warning("job %s queued but not dispatched (the broker?); the workers' sweep "
                        "sends it again", job_id, exc_info=True)
            return False
        with self.vault.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(dispatched_at=utcnow()))
        return True

    def get(self, job_id: str, *, owner: str | None = None) -> dict:
        with self.vault.session() as s:
            return self._describe(s, self._job(s, job_id, owner))

    def list(self, owner: str, *, status: str | None = None, limit: int = 50,
             before: str | None = None) -> list[dict]:
        if status is not None and status not in JOB_STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(JOB_STATUSES)}")
        with self.vault.session() as s:
            owner_row = identities.get_owner(s, owner)
            q = (select(Job).where(Job.owner_id == owner_row.id)
                 .order_by(Job.created_at.desc(), Job.id.desc()).limit(limit))
            if status is not None:
                q = q.where(Job.status == status)
            if before is not None:
                ref = self._job(s, before, owner)
                q = q.where((Job.created_at < ref.created_at)
                            | ((Job.created_at == ref.created_at) & (Job.id < ref.id)))
            return [self._describe(s, j) for j in s.scalars(q)]

    def cancel(self, job_id: str, *, owner: str | None = None) -> dict:
        with self.vault.session() as s:
            job = self._job(s, job_id, owner, lock=True)
            if job.status in TERMINAL:
                raise Conflict(f"job {job.id} is already {job.status}")
            job.cancel_requested = True
            ended = job.status == "queued"
            if ended:
                job.status, job.finished_at = "cancelled", utcnow()
                job.message = "cancelled before it started"
                stages = self._stages(s, job)
            doc = self._describe(s, job)
        if ended:
            self._discard(stages)
        return doc

    # -- staged photos --------------------------------------------------------------------
    @staticmethod
    def _stages(s: Session, job: Job) -> list[tuple[str, str]]:
        """``(identity uid, stage id)`` of the photos staged for ``job`` (none for most): of
        its identity, or of the identity it was to create (``params["uid"]``)."""
        sid = staged_photos.stage_id(job.params)
        if sid is None:
            return []
        uid = staged_photos.staged_uid(job.params)
        if uid is None and job.identity_id is not None:
            uid = s.scalar(select(Identity.uid).where(Identity.id == job.identity_id))
        return [(uid, sid)] if uid else []

    def _discard(self, stages: list[tuple[str, str]]) -> None:
        # After the commit: a job that ended keeps nothing of its photos. A job that was to
        # create the identity and did not (it failed, or was cancelled) leaves no data key.
        for uid, stage_id in stages:
            staged_photos.discard(self.vault, uid, stage_id)
            with self.vault.session(read_only=True) as s:
                created = s.scalar(select(Identity.id).where(Identity.uid == uid))
            if created is None:
                self.vault.keys.shred(uid)

    def _job(self, s: Session, job_id: str, owner: str | None, *, lock: bool = False) -> Job:
        try:
            uuid.UUID(str(job_id))
        except ValueError:
            raise NotFound(f"no job {job_id}") from None
        q = select(Job).where(Job.id == str(job_id))
        if lock:
            q = q.with_for_update()
        job = s.scalar(q)
        if job is None:
            raise NotFound(f"no job {job_id}")
        if owner is not None:
            owner_name = s.scalar(select(Owner.name).where(Owner.id == job.owner_id))
            if owner_name != owner:
                raise NotFound(f"no job {job_id}")
        return job

    def _describe(self, s: Session, job: Job) -> dict:
        handle = None
        if job.identity_id is not None:
            row = s.execute(select(Owner.name, Identity.name).join(Identity.owner)
                            .where(Identity.id == job.identity_id)).first()
            handle = f"{row[0]}/{row[1]}" if row else None
        lease = s.get(JobLease, job.id)
        return {"id": job.id, "kind": job.kind, "status": job.status,
                "progress": round(float(job.progress or 0.0), 4), "message": job.message,
                "identity": handle, "params": job.params or {}, "result": job.result,
                "error": job.error, "cancel_requested": bool(job.cancel_requested),
                "attempts": lease.attempts if lease else 0,
                "created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
                "finished_at": _iso(job.finished_at)}

    # -- running ------------------------------------------------------------------------
    def recover(self) -> int:
        """Queue again the running jobs whose worker stopped renewing its lease."""
        stale = utcnow() - dt.timedelta(seconds=self.lease_seconds)
        n = 0
        ended: list[tuple[str, str]] = []
        with self.vault.session() as s:
            rows = s.execute(select(Job, JobLease).outerjoin(JobLease, JobLease.job_id == Job.id)
                             .where(Job.status == "running")).all()
            for job, lease in rows:
                if lease is not None and _aware(lease.heartbeat_at) > stale:
                    continue
                attempts = lease.attempts if lease else 1
                if job.cancel_requested:
                    job.status, job.finished_at = "cancelled", utcnow()
                    job.message = "cancelled while its worker was gone"
                    ended += self._stages(s, job)
                elif attempts >= self.max_attempts:
                    job.status, job.finished_at = "failed", utcnow()
                    job.error = f"its worker stopped {attempts} times; giving up"
                    ended += self._stages(s, job)
                else:
                    job.status, job.dispatched_at = "queued", None  # to be sent again
                    job.message = f"resuming: its worker stopped (attempt {attempts} of " \
                                  f"{self.max_attempts})"
                    if lease is not None:
                        lease.worker = ""
                n += 1
        self._discard(ended)
        return n

    def claim(self) -> tuple[Job, JobLease, str, str | None] | None:
        """Take the oldest queued job of a kind registered here; None when there is none."""
        kinds = list(self.registry)
        if not kinds:
            return None
        with self.vault.session() as s:
            job = s.scalar(select(Job).where(Job.status == "queued", Job.kind.in_(kinds))
                           .order_by(Job.created_at, Job.id).limit(1)
                           .with_for_update(skip_locked=True))
            if job is None:
                return None
            return self._take(s, job, s.get(JobLease, job.id))

    def claim_job(self, job_id: str) -> tuple[str, object]:
        """Take one job by id, if its row says it may run here now (a worker's task):

        - ``("run", claimed)``: queued, or running under a stale lease (its worker
          died) -- taken, for :meth:`run_job`;
        - ``("busy", seconds)``: running under a live lease elsewhere; ask again later;
        - ``("ended", status)``: already done, failed or cancelled (also: cancelled
          now, or failed after ``max_attempts`` runs) -- nothing to do;
        - ``("gone", None)``: no such job (erased with its identity);
        - ``("foreign", kind)``: a kind this process cannot run;
        - ``("elsewhere", (kind, params))``: a kind for a queue this worker does not
          serve (:attr:`queues`).
        """
        with self.vault.session() as s:
            job = s.scalar(select(Job).where(Job.id == str(job_id)).with_for_update())
            if job is None:
                return "gone", None
            if job.status in TERMINAL:
                return "ended", job.status
            if job.kind not in self.registry:
                return "foreign", job.kind
            if (self.queues is not None
                    and self.registry[job.kind].queue_for(job.params or {}) not in self.queues):
                return "elsewhere", (job.kind, dict(job.params or {}))
            lease = s.get(JobLease, job.id)
            if job.status == "running":
                age = (utcnow() - _aware(lease.heartbeat_at)).total_seconds() if lease else None
                if age is not None and age < self.lease_seconds:
                    return "busy", self.lease_seconds - age
                attempts = lease.attempts if lease else 1
                if attempts >= self.max_attempts:
                    job.status, job.finished_at = "failed", utcnow()
                    job.error = f"its worker stopped {attempts} times; giving up"
            if job.status not in TERMINAL and job.cancel_requested:
                job.status, job.finished_at = "cancelled", utcnow()
                job.message = "cancelled before it ran again"
            if job.status not in TERMINAL:
                return "run", self._take(s, job, lease)
            ended, stages = job.status, self._stages(s, job)
        self._discard(stages)
        return "ended", ended

    def _take(self, s: Session, job: Job, lease: JobLease | None
              ) -> tuple[Job, JobLease, str, str | None]:
        now = utcnow()
        job.status, job.started_at = "running", job.started_at or now
        if lease is None:
            lease = JobLease(job_id=job.id, worker=self.worker_id, attempts=1, heartbeat_at=now)
            s.add(lease)
        else:
            lease.worker, lease.heartbeat_at = self.worker_id, now
            lease.attempts += 1
        s.flush()
        owner = s.scalar(select(Owner.name).where(Owner.id == job.owner_id))
        handle = None
        if job.identity_id is not None:
            name = s.scalar(select(Identity.name).where(Identity.id == job.identity_id))
            handle = f"{owner}/{name}" if name else None
        return job, lease, owner, handle

    def lost(self, grace: float, resend_after: float) -> list[tuple[str, str, dict]]:
        """``(id, kind, params)`` of queued jobs for the workers' sweep to send (again):
        never sent and older than ``grace`` seconds (a broker outage at submission, a
        server killed right after its commit, a job queued again by :meth:`recover`), or
        sent more than ``resend_after`` seconds ago and still not taken (a broker that
        lost its messages)."""
        now = utcnow()
        unsent = (Job.dispatched_at.is_(None)
                  & (Job.created_at < now - dt.timedelta(seconds=grace)))
        stale = Job.dispatched_at < now - dt.timedelta(seconds=resend_after)
        with self.vault.session(read_only=True) as s:
            rows = s.execute(select(Job.id, Job.kind, Job.params).where(
                Job.status == "queued", unsent | stale,
                Job.kind.in_(list(self.registry)))).all()
        return [(i, k, p or {}) for i, k, p in rows]

    def run_job(self, claimed: tuple[Job, JobLease, str, str | None]) -> str:
        """Run a claimed job to its end; returns its final status."""
        job, lease, owner, handle = claimed
        spec = self.registry[job.kind]
        ctx = JobContext(self, job, owner, handle, lease.checkpoint, lease.attempts)
        ctx.deadline = time.monotonic() + spec.time_limit
        self._current = job.id
        beat = threading.Thread(target=self._heartbeat, args=(job.id,), daemon=True)
        done = threading.Event()
        beat.done = done  # type: ignore[attr-defined]
        beat.start()
        status, result, error, message = "done", None, None, None
        try:
            result = spec.run(ctx)
            if result is not None and not isinstance(result, dict):
                raise TypeError(f"job kind {job.kind} returned {type(result).__name__}, "
                                "not a dict")
            if result is not None:
                json.dumps(result)
        except JobTimedOut:
            status, error = "failed", f"ran past its time limit of {spec.time_limit:.0f} s"
        except JobCancelled:
            status, message = "cancelled", "cancelled while running"
        except VaultError as exc:
            status, error = "failed", str(exc)
        except Exception as exc:
            log.exception("job %s (%s) failed", job.id, job.kind)
            status, error = "failed", f"internal error ({type(exc).__name__}); see the server log"
        finally:
            done.set()
            self._current = None
        with self.vault.session() as s:
            row = s.get(Job, job.id)
            if row is None:
                return status  # deleted meanwhile (its identity was erased)
            held = s.get(JobLease, job.id)
            if held is not None and held.worker != self.worker_id:
                log.warning("job %s was taken over by %s while this worker ran it (its lease "
                            "went stale); leaving the result to it", job.id, held.worker)
                return status
            if row.status == "done":
                status = "done"  # the kind marked it done with its effects (ctx.finish)
            else:
                row.status, row.finished_at = status, utcnow()
                if status == "done":
                    row.progress, row.result = 1.0, result
                row.error = error
                if message is not None:
                    row.message = message
            stages = self._stages(s, row)
        self._discard(stages)
        return status

    def _heartbeat(self, job_id: str) -> None:
        me = threading.current_thread()
        while not me.done.wait(max(self.lease_seconds / 3, 0.05)):  # type: ignore[attr-defined]
            try:
                with self.vault.session() as s:
                    s.execute(update(JobLease).where(JobLease.job_id == job_id)
                              .values(heartbeat_at=utcnow()))
            except Exception:
                log.warning("could not renew the lease of job %s", job_id, exc_info=True)

    def run_one(self) -> str | None:
        """Claim and run one job; its final status, or None when nothing was queued."""
        claimed = self.claim()
        return None if claimed is None else self.run_job(claimed)

    def run_pending(self, max_jobs: int | None = None) -> int:
        """Run queued jobs in this thread until none is left (tests, scripts)."""
        self.recover()
        n = 0
        while max_jobs is None or n < max_jobs:
            if self.run_one() is None:
                break
            n += 1
        return n

    # -- the embedded worker thread --------------------------------------------------------
    def start(self) -> None:
        """Run jobs on a background thread (the embedded default)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="idvault-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        last_recover = 0.0
        last_sweep = -SWEEP_EVERY_SECONDS
        import time

        while not self._stop.is_set():
            try:
                now = time.monotonic()
                if now - last_recover > self.lease_seconds / 2:
                    self.recover()
                    last_recover = now
                if now - last_sweep > SWEEP_EVERY_SECONDS:
                    staged_photos.sweep(self.vault)  # orphans of a crash mid-submit
                    self.vault.sweep_recent_orphan_keys()  # data keys of enrollments killed early
                    last_sweep = now
                if self.run_one() is not None:
                    continue
            except Exception:
                log.exception("job worker error")
            self._wake.wait(self.poll_seconds)
            self._wake.clear()


def describe_kinds(registry: dict[str, JobKind] | None = None) -> list[dict]:
    reg = REGISTRY if registry is None else registry
    return [{"kind": k.name, "scope": k.scope, "description": k.description,
             "needs_identity": k.needs_identity, "trusted_params": k.trusted_params}
            for k in sorted(reg.values(), key=lambda k: k.name)]


# -- built-in kinds ------------------------------------------------------------------------
def _rebuild_index(ctx: JobContext) -> dict:
    ctx.progress(0.0, "decrypting face artifacts")

    def progress(done: int, total: int) -> None:
        ctx.progress(done / max(total, 1), f"decrypted {done} of {total} face artifacts")

    stats = ctx.vault.rebuild_index(ctx.owner, progress=progress)
    return {"identities": stats["identities"], "vectors": stats["vectors"]}


def _no_params(params: dict) -> dict:
    if params:
        raise InvalidInput(f"this job kind takes no params (got {', '.join(sorted(params))})")
    return {}


def _sweep_retention(ctx: JobContext) -> dict:
    ctx.progress(0.0, "erasing identities past their retention date")
    receipts = ctx.vault.sweep_retention(owner=ctx.owner, actor=f"job:{ctx.job_id}")
    return {"erased": [r["handle"] for r in receipts]}


register_kind(JobKind(
    "rebuild_index", _rebuild_index, scope="admin", validate=_no_params, queue="cpu",
    description="rebuild the running process's in-memory dedupe index of the owner from the "
                "encrypted store (every process also catches up on its own before it searches)"))
register_kind(JobKind(
    "retention_sweep", _sweep_retention, scope="admin", validate=_no_params, queue="cpu",
    description="erase the owner's identities whose consent's retention date has passed "
                "(signed receipts, as `idvault retention sweep`)"))
