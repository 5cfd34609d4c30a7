"""``idvault worker``: a Celery worker that runs idvault's jobs (a scale-out deployment).

The API nodes (``idvault serve`` with the same broker) queue jobs; workers run
them: ``gpu`` workers the model work (generation, personalisation fits,
enrollments with PhotoMaker / StoryMaker artifacts), ``cpu`` workers the rest
(face-only enrollments, index work, the retention sweep). docs/deployment.md
describes a whole deployment.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from vault import errors
from vault.config import Settings
from vault.jobs import QUEUES
from web.cli.common import open_vault, vault_options


def _queues(raw: str) -> tuple[str, ...]:
    queues = tuple(dict.fromkeys(q.strip() for q in raw.split(",") if q.strip()))
    unknown = [q for q in queues if q not in QUEUES]
    if not queues or unknown:
        raise click.BadParameter(f"a comma-separated list of {', '.join(QUEUES)}"
                                 + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return queues


@click.command()
@click.option("--broker-url", default=None,
              help="Redis URL of the broker the API nodes send jobs to [env "
                   "IDVAULT_BROKER_URL; required].")
@click.option("--queues", "queues_raw", default="gpu,cpu", show_default=True,
              help="Queues to take jobs from: gpu (model work), cpu (face-only enrollment, "
                   "index work, retention), or both.")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Jobs run at once, one process each (1 per GPU).")
@click.option("--pool", type=click.Choice(["prefork", "solo"]), default="prefork",
              show_default=True,
              help="prefork: jobs in child processes (time limits enforced); solo: in the "
                   "worker's own process.")
@click.option("--models", "models_dir", type=click.Path(path_type=Path), default=None,
              help="Models folder: face packs, SDXL, PhotoMaker / StoryMaker [env "
                   "IDVAULT_MODELS].")
@click.option("--warm/--no-warm", default=False, show_default=True,
              help="Load the dedupe indexes and the models before the first job.")
@click.option("--loglevel", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@vault_options
def worker(broker_url: str | None, queues_raw: str, concurrency: int, pool: str,
           models_dir: Path | None, warm: bool, loglevel: str, settings: Settings) -> int:
    """Run a Celery worker for the jobs of a scale-out deployment.

    It needs the same vault settings as the API nodes (data and key-store
    databases, key provider) and the broker they send jobs to. Jobs whose
    worker dies are delivered again and resume; a finished job never runs twice.

    \b
    Example (a GPU machine, models warm, next to PostgreSQL and Redis):
      export IDVAULT_DATABASE_URL=postgresql+psycopg://idvault@db/idvault
      export IDVAULT_KEYSTORE_URL=postgresql+psycopg://idvault@keys/idvault_keys
      idvault worker --broker-url redis://redis:6379/0 --queues gpu \\
          --models /srv/models --warm
    """
    from web.workers.runtime import WorkerConfig
    from web.workers.worker import run_worker

    if broker_url:
        settings = settings.with_(broker_url=broker_url)
    if not settings.broker_url:
        raise errors.InvalidInput("a worker needs the broker: --broker-url redis://HOST:6379/0 "
                                  "or IDVAULT_BROKER_URL")
    queues = _queues(queues_raw)
    models = models_dir or (Path(os.environ["IDVAULT_MODELS"])
                            if os.environ.get("IDVAULT_MODELS") else None)
    with open_vault(settings):  # a wrong key or an unreachable database fails here, at once
        pass
    config = WorkerConfig(settings, settings.broker_url, queues, models, warm)
    return run_worker(config, concurrency=concurrency, pool=pool, loglevel=loglevel)


def register(cli: click.Group) -> None:
    cli.add_command(worker)
