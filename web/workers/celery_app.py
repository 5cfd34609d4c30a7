"""The Celery application of a scale-out deployment: one task that runs a job by id.

The ``jobs`` table is the system of record (status, progress, results,
cancel, audit: :mod:`vault.jobs`); Celery carries execution. A submitted job's
id is sent to the queue its kind needs -- ``gpu`` (generation, personalisation
fits, enrollments computing PhotoMaker / StoryMaker artifacts) or ``cpu``
(face-only enrollments, index work, the retention sweep) -- and the task (``web.workers.tasks.run_job``, registered by the worker) runs it on a
worker listening there; an API node only sends its name.

What Celery does for us:

- ``acks_late`` with prefetch 1 and ``reject_on_worker_lost``: a message is
  acknowledged only when its job has ended, one at a time per worker process,
  so a job whose worker process dies is delivered again;
- routing by queue (a worker listening only on ``cpu`` never receives a GPU
  kind);
- retries with limits: a database or broker hiccup retries with backoff; a
  job running under another worker's live lease is asked about again later;
- time limits: the kind's own (``JobKind.time_limit``, cooperative, checked at
  each progress report) and a hard one a minute later that ends the process.

What the rows do: a job runs only when its row says it may
(:meth:`vault.jobs.JobQueue.claim_job`), so a message delivered twice runs the
job once, and a job that had finished writes nothing again.
"""

from __future__ import annotations

from functools import lru_cache

from celery import Celery
from kombu import Exchange, Queue

from vault.jobs import QUEUES, REGISTRY

TASK = "idvault.run_job"
HARD_LIMIT_GRACE = 60.0  # seconds past the kind's own limit before the process is ended
# A redelivered message of a job still running elsewhere asks again this often, this many
# times (a long fit outlives it; the workers' sweep then sends the job again if needed).
BUSY_RETRIES = 200
# Redis holds an unacknowledged message this long before another worker may take it
# (a worker killed outright; one whose process died is redelivered at once).
VISIBILITY_TIMEOUT = 3600
PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.5,
                 "interval_max": 1.0}


def make_app(broker_url: str) -> Celery:
    app = Celery("idvault", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue="cpu",
        # One direct exchange per queue: a job sent to "gpu" can only reach "gpu" workers.
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name)
                     for name in QUEUES],
        task_create_missing_queues=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2.0,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        worker_hijack_root_logger=False,
        # A pool process loads the indexes and models before it says it is up (--warm): a
        # 1M-identity roster took ~4 minutes on 2 cores.
        worker_proc_alive_timeout=3600.0,
        worker_send_task_events=False,
    )
    return app


@lru_cache(maxsize=4)
def app_for(broker_url: str) -> Celery:
    """One Celery app per broker per process (the API node's sender, a worker's app)."""
    return make_app(broker_url)


def dispatcher(broker_url: str):
    """``JobQueue.dispatch`` for a scale-out deployment: send the job id to its queue."""

    def dispatch(job_id: str, kind: str, queue: str) -> None:
        spec = REGISTRY.get(kind)
        limit = spec.time_limit if spec is not None else None
        app_for(broker_url).send_task(
            TASK, args=[job_id], queue=queue,
            time_limit=None if limit is None else limit + HARD_LIMIT_GRACE,
            # A broker that is away must not hold the request for long: the job is
            # committed already, and a worker's sweep sends it later.
            retry=True, retry_policy=PUBLISH_RETRY)

    return dispatch
