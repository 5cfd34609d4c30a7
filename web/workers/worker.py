"""Starting a Celery worker with idvault's task: ``idvault worker``.

One worker node listens on the queues it is given (``gpu``, ``cpu`` or both),
runs ``--concurrency`` pool processes, each with its own long-lived
:class:`~web.workers.runtime.Runtime` (warmed at start when asked), and in its
main process the :class:`~web.workers.runtime.Sweeper`.
"""

from __future__ import annotations

import logging
import socket
import uuid

from web.workers import tasks
from web.workers.celery_app import app_for
from web.workers.runtime import Sweeper, WorkerConfig, configure, runtime

log = logging.getLogger("idvault.workers")
POOLS = ("prefork", "solo")


def run_worker(config: WorkerConfig, *, concurrency: int = 1, pool: str = "prefork",
               loglevel: str = "INFO", hostname: str | None = None) -> int:
    """Run the worker until it is stopped (SIGTERM: finish the running jobs; a second
    signal, or SIGKILL, ends them, and their jobs are delivered again). Its exit code."""
    from celery import signals

    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}")
    configure(config)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the schema check at each open
    app = app_for(config.broker_url)
    tasks.register(app)
    sweeper: list[Sweeper] = []

    def child_ready(**_: object) -> None:  # each pool process, before its first job
        if config.warm:
            runtime().warm()

    def node_ready(**_: object) -> None:  # the main process, once the pool is up
        if pool == "solo":
            child_ready()
        sweeper.append(Sweeper(runtime().jobs))
        sweeper[0].start()
        log.info("idvault worker ready: queues %s, %d process(es)", ",".join(config.queues),
                 concurrency)

    signals.worker_process_init.connect(child_ready, weak=False)
    signals.worker_ready.connect(node_ready, weak=False)
    name = hostname or f"idvault-{'+'.join(config.queues)}-{uuid.uuid4().hex[:6]}@" \
                       f"{socket.gethostname()}"
    worker = app.Worker(queues=list(config.queues), concurrency=concurrency, pool=pool,
                        loglevel=loglevel, hostname=name, without_mingle=True,
                        without_gossip=True, optimization="fair")
    try:
        worker.start()
    finally:
        for s in sweeper:
            s.stop()
    return int(worker.exitcode or 0)
