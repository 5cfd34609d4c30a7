"""The one task of idvault's workers: run a job by id (see :mod:`web.workers.celery_app`)."""

from __future__ import annotations

import logging

from celery import Celery

from web.workers.celery_app import BUSY_RETRIES, TASK
from web.workers.runtime import runtime

log = logging.getLogger("idvault.workers")


def register(app: Celery) -> None:
    app.task(name=TASK, bind=True, max_retries=BUSY_RETRIES)(run_job)


def run_job(task, job_id: str) -> str:
    """Run one job by id on this worker process (see the module docstring)."""
    from sqlalchemy.exc import OperationalError

    rt = runtime()
    try:
        verdict, detail = rt.jobs.claim_job(job_id)
    except OperationalError as exc:  # the database away for a moment
        raise task.retry(exc=exc, countdown=min(60, 2 ** task.request.retries),
                         max_retries=8) from None
    if verdict == "run":
        job = detail[0]
        log.info("job %s (%s): running, attempt %d", job_id, job.kind, detail[1].attempts)
        status = rt.jobs.run_job(detail)
        log.info("job %s (%s): %s", job_id, job.kind, status)
        return status
    if verdict == "busy":  # running under another worker's live lease: ask again later
        raise task.retry(countdown=max(1.0, float(detail)))
    if verdict == "elsewhere":  # a kind for another queue: send it there
        kind, params = detail
        rt.jobs.send(job_id, kind, params)
        log.warning("job %s (%s) was delivered to queues %s; sent on to its own", job_id,
                    kind, ",".join(rt.queues))
    else:
        log.info("job %s: %s (%s), nothing to run", job_id, verdict, detail)
    return verdict
