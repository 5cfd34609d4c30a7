"""``idvault personalize`` (fit Celeb Basis / LiDB as a job) and ``idvault artifact export``.

``personalize`` submits a ``celeb_basis`` or ``lidb`` job (:mod:`encoders.fitting.jobs`)
and runs that job, and only it, in this process, reporting its progress and the time
left (:mod:`web.cli.progress`); Ctrl-C cancels it at its next step. A job that
stopped because the process died resumes from its last checkpoint the next time a
worker (the server's embedded worker, or a scale-out one) runs it. Without CUDA a fit
of the default length takes hours: it is refused unless ``--steps`` or ``--yes`` says
so, with the expected time (:mod:`encoders.fitting.estimate`).

``artifact export`` writes an artifact in a format other tools load: a
textual-inversion file (Celeb Basis), a diffusers LoRA (LiDB), a ReActor face
model (face) or FaceID Plus v2 embeds for diffusers (faceid).

Wire with ``register(cli)`` (adds ``personalize`` and ``artifact export``).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import click

from vault import errors
from vault.config import Settings
from vault.private_files import write_private
from web.cli.common import Interrupted, emit, open_vault, vault_options
from web.cli.progress import Progress, duration, progress_option

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
@click.option("--yes", is_flag=True,
              help="Without CUDA, run a fit of the default length anyway (refused otherwise: "
                   "it takes hours on a CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print the finished job as JSON.")
@progress_option("personalize")
@vault_options
def personalize(handle: str, kind: str, photos: tuple[Path, ...], base_model: Path,
                steps: int | None, seed: int, mode: str, models_dir: Path | None, yes: bool,
                as_json: bool, progress: Progress, settings: Settings) -> None:
    """Fit a Celeb Basis or LiDB artifact for HANDLE from photos (consent: personalize).

    The identity, its consent, Celeb Basis's face artifact, the photos
    (readable images) and the base model folder (a diffusers pipeline) are
    checked before any model loads. Without CUDA a fit of the default length
    takes hours: it is refused, with the expected time, unless --steps or
    --yes is given. Ctrl-C cancels the fit at its next step (exit 130).

    \b
    Example (a short fit, as a CPU allows; leave out --steps on a GPU):
      idvault personalize smiths/ana --kind celeb_basis --photos ana1.jpg --photos ana2.jpg \\
          --base-model ~/models/sd15 --steps 100
    """
    import encoders.fitting.jobs  # noqa: F401  (registers the job kinds)
    from encoders.fitting.estimate import default_steps
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
        total = steps or default_steps(kind, mode)  # torch-free
        _check_time(progress, kind, base_model, total, steps_given=steps is not None, yes=yes)
        from vault.audit import cli_actor

        owner = Handle.parse(handle).owner
        queue = JobQueue(vault, registry={kind: REGISTRY[kind]})
        job = queue.submit(owner, kind, params, identity=handle,
                           actor=cli_actor())
        doc = _run_with_progress(queue, owner, job["id"], progress, total, base_model)
    if doc["status"] == "cancelled":
        raise Interrupted(f"job {doc['id']} cancelled at step {doc['steps_done']} of {total} "
                          "(nothing was stored)", job=doc["id"])
    if doc["status"] != "done":
        raise errors.VaultError(f"job {doc['id']} {doc['status']}: "
                                f"{doc.get('error') or doc.get('message') or ''}", job=doc["id"])
    result = doc["result"] or {}
    emit(doc, as_json, lambda: (
        f"fitted {kind} for {handle}: artifact {result.get('artifact')} (model "
        f"{result.get('model_id')}, {result.get('steps')} steps, loss "
        f"{result.get('first_loss', 0):.4f} -> {result.get('last_loss', 0):.4f}); job {doc['id']}"))


def _check_time(progress: Progress, kind: str, base_model: Path, total: int, *,
                steps_given: bool, yes: bool) -> None:
    """Say how long the fit will take; without CUDA, refuse a default-length fit unless
    ``--yes``. Before the base model loads (only torch is imported, to ask for CUDA)."""
    progress.say("loading torch...")
    import torch

    if torch.cuda.is_available():
        progress.say(f"{kind}: {total} steps on CUDA (the time left follows its first steps)",
                     phase="estimate")
        return
    from encoders.fitting.estimate import cpu_seconds_per_step

    per_step = cpu_seconds_per_step(base_model)
    expected = (f"{kind} runs {total} steps; without CUDA, on this CPU, that takes about "
                f"{duration(per_step * total)} (roughly {per_step:.2g} s a step for "
                f"{base_model.name})")
    if not steps_given and not yes:
        raise errors.InvalidInput(f"{expected}: pass --steps N for a shorter fit or --yes to "
                                  "run it anyway", steps=total,
                                  estimate_s=round(per_step * total, 1))
    progress.say(expected + "; the time left follows its first steps", phase="estimate")


STEP = re.compile(r"step (\d+)/(\d+)")


def _run_with_progress(queue, owner: str, job_id: str, progress: Progress, total: int,
                       base_model: Path) -> dict:
    """Run job ``job_id`` (only it: an older queued job, even of this kind, is left to the
    server's workers) on a thread, reporting its progress; Ctrl-C cancels it and waits for
    it to stop, at its next step. The job's final document, with ``steps_done``."""
    from encoders.fitting.jobs import fit_step

    finished = threading.Event()

    def work() -> None:
        try:
            state, claimed = queue.claim_job(job_id)
            if state == "run":
                queue.run_job(claimed)
        finally:
            finished.set()

    said = queue.get(job_id, owner=owner).get("message")  # "submitted by ..."
    # The job's first act; said here, as a poll may miss a short load's message.
    progress.say(f"loading base model {base_model.name}...")
    worker = threading.Thread(target=work, name="idvault-fit", daemon=True)
    worker.start()
    phase = progress.phase("fit", start="fitting {total} steps", done="fitted", estimate=True)
    try:
        while True:
            doc = queue.get(job_id, owner=owner)
            message = doc.get("message") or ""
            step = STEP.search(message)
            if message == said or re.match(r"load(ing|ed) base model", message):
                pass
            elif step:
                phase(int(step[1]), int(step[2]))
            elif doc["status"] == "running":  # loading the base model, predicting LiDB...
                progress.say(message + ("..." if message.startswith(("loading", "predicting"))
                                        else ""))
            said = message
            if doc["status"] in ("done", "failed", "cancelled") or finished.is_set():
                finished.wait()
                doc = queue.get(job_id, owner=owner)
                if doc["status"] == "done" and phase.started is not None:
                    phase(total, total)  # its last step's message was overwritten at once
                phase.close(completed=doc["status"] == "done")
                return {**doc, "steps_done": fit_step(doc["progress"], total)}
            # Not worker.join(timeout): a Ctrl-C inside Thread.join can leave the thread
            # marked stopped while it runs on; an Event's wait is safe to interrupt.
            finished.wait(0.25)
    except KeyboardInterrupt:
        phase.close(completed=False)
        try:
            doc = queue.cancel(job_id, owner=owner)
        except errors.Conflict:  # it ended meanwhile
            doc = queue.get(job_id, owner=owner)
        at = fit_step(doc["progress"], total)
        progress.say(f"cancelling job {job_id} at step {at} of {total} (it stops at its next "
                     "step)...", phase="cancel")
        finished.wait()
        doc = queue.get(job_id, owner=owner)
        return {**doc, "steps_done": fit_step(doc["progress"], total)}


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
    """Export HANDLE's artifact for other tools (consent: share; audited).

    \b
    Example:
      idvault artifact export smiths/ana --format textual-inversion -o ana-ti.safetensors
    """
    from encoders.fitting.exports import export

    with open_vault(settings) as vault:
        data = export(vault, handle, fmt.replace("-", "_"), model_id=model_id, token=token,
                      base_model=base_model).data
    write_private(output, data)
    click.echo(f"wrote {output} ({len(data)} bytes, {fmt})")


def register(cli: click.Group) -> None:
    cli.add_command(personalize)
    artifact = cli.commands.get("artifact")
    if not isinstance(artifact, click.Group):
        raise TypeError("register the core commands (the 'artifact' group) first")
    artifact.add_command(artifact_export)
