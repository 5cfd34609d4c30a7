"""Scale-out: jobs run by Celery workers over Redis instead of a thread of the server.

- :mod:`web.workers.celery_app`: the Celery app and the dispatcher an API node hands new
  jobs to;
- :mod:`web.workers.tasks`: the one task a worker runs, a job by id;
- :mod:`web.workers.runtime`: a worker process's long-lived vault, job queue and models,
  and the sweeper that re-sends what a dead worker or a lost message left queued;
- :mod:`web.workers.worker`: starting a worker (``idvault worker``).

With no broker set nothing here is used: the server runs jobs on its own thread.
"""
