"""A worker process's long-lived state: its vault, its job queue and the models it keeps.

Each process that runs jobs (a Celery pool process) opens the vault once and
keeps it: the dedupe index, loaded on first use and then only caught up from
the change log (:mod:`vault.dedupe_sync`), and the pipelines the job kinds
load (the generator's, the enroller's) live as long as the process, so a job
pays for its own work, not for loading. :meth:`Runtime.warm` loads them before
the first job.

The worker's main process runs :class:`Sweeper`: every few seconds it queues
again the jobs whose worker stopped renewing its lease and sends the queued
jobs nobody has sent (or whose message a broker lost).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vault import staged_photos
from vault.config import Settings
from vault.jobs import SWEEP_EVERY_SECONDS, JobQueue

log = logging.getLogger("idvault.workers")

# Modules whose import registers the job kinds a worker runs (none imports the ML stack
# until a job of its kind runs).
KIND_MODULES = ("vault.jobs", "web.generation", "encoders.fitting.jobs",
                "encoders.enrollment_job")


@dataclass(frozen=True)
class WorkerConfig:
    """What every process of one worker shares (set before the pool starts)."""

    settings: Settings
    broker_url: str
    queues: tuple[str, ...]
    models_dir: Path | None = None
    warm: bool = False


_config: WorkerConfig | None = None
_runtime: tuple[int, Runtime] | None = None  # (pid, runtime): a forked child makes its own
_lock = threading.Lock()


def configure(config: WorkerConfig) -> None:
    global _config
    _config = config


def load_kinds() -> None:
    import importlib

    for module in KIND_MODULES:
        importlib.import_module(module)


class Runtime:
    def __init__(self, config: WorkerConfig) -> None:
        from vault.vault import Vault
        from web.workers.celery_app import dispatcher

        load_kinds()
        self.config = config
        self.queues = config.queues
        self.vault = Vault.open(config.settings)
        self.jobs = JobQueue(self.vault, dispatch=dispatcher(config.broker_url))
        self.jobs.queues = config.queues
        self.jobs.models_dir = config.models_dir  # type: ignore[attr-defined]  # kinds read it

    def warm(self) -> None:
        """Load what this worker's jobs need before the first one arrives: every owner's
        dedupe index (enrollments search it), the face models, and on a GPU worker the
        generator's pipeline when a base model is installed. What cannot be loaded is
        said and left to the first job."""
        from vault.errors import VaultError

        started = time.monotonic()
        stats = self.vault.rebuild_index()
        log.info("warm: dedupe indexes loaded (%d identities of %d owners) in %.1f s",
                 stats["identities"], stats["owners"], time.monotonic() - started)
        models = self.config.models_dir
        try:
            from encoders.enrollment_job import enroller

            enroller(self.vault, models)
            log.info("warm: face models loaded")
        except VaultError as exc:
            log.warning("warm: face models not loaded: %s", exc)
        if "gpu" in self.queues:
            try:
                from web.generation import pipeline

                pipeline(self.vault, models)
                log.info("warm: the generation pipeline is loaded")
            except VaultError as exc:
                log.warning("warm: no generation pipeline: %s", exc)


def runtime() -> Runtime:
    """This process's runtime, made on first use (after a fork, afresh)."""
    global _runtime
    pid = os.getpid()
    with _lock:
        if _runtime is None or _runtime[0] != pid:
            if _config is None:
                raise RuntimeError("the worker is not configured (web.workers.runtime."
                                   "configure)")
            _runtime = (pid, Runtime(_config))
        return _runtime[1]


def _after_fork_in_child() -> None:
    # The parent's engines must not be used, nor closed, from the child: their
    # connections belong to the parent (closing one would end the parent's session).
    global _runtime
    if _runtime is not None:
        _, inherited = _runtime
        inherited.vault.engine.dispose(close=False)
        inherited.vault.keystore_engine.dispose(close=False)
        _runtime = None


os.register_at_fork(after_in_child=_after_fork_in_child)


class Sweeper:
    """The worker's housekeeping thread (see the module docstring)."""

    def __init__(self, jobs: JobQueue, *, every: float | None = None) -> None:
        self.jobs = jobs
        self.every = every or max(jobs.lease_seconds / 3, 0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="idvault-sweeper",
                                        daemon=True)
        self._last_staged = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def sweep(self) -> int:
        """One round; returns how many jobs were sent."""
        import time

        self.jobs.recover()
        sent = 0
        for job_id, kind, params in self.jobs.lost(grace=self.jobs.lease_seconds,
                                                   resend_after=3600.0):
            sent += self.jobs.send(job_id, kind, params)
        if time.monotonic() - self._last_staged > SWEEP_EVERY_SECONDS:
            staged_photos.sweep(self.jobs.vault)  # orphans of a crash mid-submit
            self.jobs.vault.sweep_recent_orphan_keys()  # data keys of enrollments killed early
            self._last_staged = time.monotonic()
        return sent

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
            except Exception:
                log.exception("worker sweep failed")
            self._stop.wait(self.every)
