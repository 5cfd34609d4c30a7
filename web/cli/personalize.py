"""``idvault personalize`` (fit Celeb Basis / LiDB as a job) and ``idvault artifact export``.

``personalize`` submits a ``celeb_basis`` or ``lidb`` job (:mod:`encoders.fitting.jobs`)
and runs it in this process with a progress bar; Ctrl-C cancels it. A job that
stopped because the process died resumes from its last checkpoint the next
time a worker (this command, or the server's embedded worker) runs it.

``artifact export`` writes an artifact in a format other tools load: a
textual-inversion file (Celeb Basis), a diffusers LoRA (LiDB), a ReActor face
model (face) or FaceID Plus v2 embeds for diffusers (faceid).

Wire with ``register(cli)`` (adds ``personalize`` and ``artifact export``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import click

from vault.config import Settings
from web.cli.common import emit, open_vault, vault_options

KINDS = ("celeb_basis", "lidb")


@click.command("personalize")
@click.argument("handle")
@click.option("--kind", type=click.Choice(KINDS), required=True,
              help="celeb_basis: Celeb Basis coefficients; lidb: HyperDreamBooth LiDB weights.")
@click.option("--photos", "photos", multiple=True, required=True,
              type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="A face photo to fit on (repeat for several). The vault stores no photos, "
                   "so the fit needs them again; give face crops.")
@click.option("--base-model", type=click.Path(path_type=Path, file_okay=False, exists=True),
              required=True, help="The diffusers folder (SD1.x or SDXL) to fit against.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Optimisation steps [celeb_basis 400; lidb fast 40, scratch 400].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the fit (and of LiDB's aux matrices).")
@click.option("--mode", type=click.Choice(["fast", "scratch"]), default="fast",
              show_default=True, help="lidb only: rank-relaxed fast fine-tune or a rank-1 "
                                      "fit from scratch.")
@click.option("--models", "models_dir", type=click.Path(path_type=Path, file_okay=False),
              default=None, help="lidb: folder holding a trained lidb_hypernetwork.safetensors; "
                                 "its prediction starts the fast fine-tune.")
@click.option("--json", "as_json", is_flag=True, help="Print the finished job as JSON.")
@vault_options
def personalize(handle: str, kind: str, photos: tuple[Path, ...], base_model: Path,
                steps: int | None, seed: int, mode: str, models_dir: Path | None,
                as_json: bool, settings: Settings) -> None:
    """Fit a Celeb Basis or LiDB artifact for HANDLE from photos (consent: personalize).

    The identity, its consent, Celeb Basis's face artifact, the photos
    (readable images) and the base model folder (a diffusers pipeline) are
    checked before any model loads."""
    import encoders.fitting.jobs  # noqa: F401  (registers the job kinds)
    from encoders.preflight import check_fit
    from vault.handles import Handle
    from vault.jobs import REGISTRY, JobQueue

    params: dict = {"photos": [str(p.resolve()) for p in photos],
                    "base_model": str(base_model.resolve()), "seed": seed}
    if steps is not None:
        params["steps"] = steps
    if kind == "lidb":
        params["mode"] = mode
        if models_dir is not None:
            params["models_dir"] = str(models_dir.resolve())
    with open_vault(settings) as vault:
        # What the job would refuse once torch and the base model load, before submitting.
        check_fit(vault, handle, kind=kind, photos=photos, base_model=base_model)
        from vault.audit import cli_actor

        owner = Handle.parse(handle).owner
        # Only this kind: the command runs the job it submitted, not the server's backlog
        # (an older queued job of the same kind runs first).
        queue = JobQueue(vault, registry={kind: REGISTRY[kind]})
        job = queue.submit(owner, kind, params, identity=handle,
                           actor=cli_actor())
        doc = _run_with_progress(queue, owner, job["id"])
    if doc["status"] != "done":
        raise click.ClickException(f"job {doc['id']} {doc['status']}: "
                                   f"{doc.get('error') or doc.get('message') or ''}")
    result = doc["result"] or {}
    emit(doc, as_json, lambda: (
        f"fitted {kind} for {handle}: artifact {result.get('artifact')} (model "
        f"{result.get('model_id')}, {result.get('steps')} steps, loss "
        f"{result.get('first_loss', 0):.4f} -> {result.get('last_loss', 0):.4f}); job {doc['id']}"))


def _run_with_progress(queue, owner: str, job_id: str) -> dict:
    from tqdm import tqdm

    worker = threading.Thread(target=lambda: queue.run_pending(), daemon=True)
    worker.start()
    bar = tqdm(total=100, file=sys.stderr, disable=None, leave=False, unit="%")
    try:
        while True:
            doc = queue.get(job_id, owner=owner)
            bar.n = round(100 * doc["progress"])
            bar.set_description((doc.get("message") or doc["status"])[:60])
            if doc["status"] in ("done", "failed", "cancelled"):
                return doc
            if not worker.is_alive() and doc["status"] == "queued":
                worker = threading.Thread(target=lambda: queue.run_pending(), daemon=True)
                worker.start()
            time.sleep(0.5)
    except KeyboardInterrupt:
        queue.cancel(job_id, owner=owner)
        click.echo("cancelling (stops at the next step)...", err=True)
        worker.join()
        return queue.get(job_id, owner=owner)
    finally:
        bar.close()


@click.command("export")
@click.argument("handle")
@click.option("--format", "fmt", type=click.Choice(["textual-inversion", "diffusers-lora",
                                                    "reactor", "ip-adapter-embeds"]),
              required=True, help="textual-inversion: a Celeb Basis identity's two tokens; "
                                  "diffusers-lora: a LiDB identity's LoRA; reactor: a ReActor "
                                  "face model (face artifact); ip-adapter-embeds: FaceID Plus "
                                  "v2 inputs for diffusers (faceid artifact).")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="Where to write the safetensors file (created 0600).")
@click.option("--base-model", type=click.Path(path_type=Path, file_okay=False, exists=True),
              default=None, help="diffusers-lora: the base model folder (its configs give the "
                                 "layer shapes the aux matrices are regenerated at).")
@click.option("--token", default=None,
              help="textual-inversion: the new token [default: <idvault-OWNER-NAME>].")
@click.option("--model-id", default=None, help="Which artifact, when there are several.")
@vault_options
def artifact_export(handle: str, fmt: str, output: Path, base_model: Path | None,
                    token: str | None, model_id: str | None, settings: Settings) -> None:
    """Export HANDLE's artifact for other tools (consent: share; audited)."""
    from encoders.fitting.exports import export

    with open_vault(settings) as vault:
        data = export(vault, handle, fmt.replace("-", "_"), model_id=model_id, token=token,
                      base_model=base_model).data
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    click.echo(f"wrote {output} ({len(data)} bytes, {fmt})")


def register(cli: click.Group) -> None:
    cli.add_command(personalize)
    artifact = cli.commands.get("artifact")
    if not isinstance(artifact, click.Group):
        raise TypeError("register the core commands (the 'artifact' group) first")
    artifact.add_command(artifact_export)
