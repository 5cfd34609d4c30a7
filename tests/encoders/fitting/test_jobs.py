"""The celeb_basis / lidb jobs: consent, sealed result, a killed job resumes, CLI export."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

import encoders.fitting.jobs  # noqa: F401  (registers the job kinds)
from encoders.fitting import celeb_basis as cb
from encoders.fitting import lidb
from tests.helpers import consent, face_payload
from vault import codec
from vault.jobs import REGISTRY, JobContext, JobQueue
from vault.models import JobLease


@pytest.fixture(scope="module")
def base_model(tiny_sd15) -> Path:
    return tiny_sd15


@pytest.fixture
def photos(tmp_path) -> list[str]:
    out = []
    for i in range(2):
        rgb = np.random.default_rng(i).integers(0, 255, (48, 48, 3), dtype=np.uint8)
        path = tmp_path / f"face{i}.png"
        Image.fromarray(rgb).save(path)
        out.append(str(path))
    return out


def _identity(vault, name: str, purposes=("enroll", "generate", "personalize", "share")):
    handle = f"smiths/{name}"
    vault.create_identity(handle, consent(purposes=list(purposes)), actor="test")
    vault.put_artifact(handle, "face", face_payload(seed=3), actor="test")
    return handle


def _queue(vault, **kw) -> JobQueue:
    return JobQueue(vault, registry={k: REGISTRY[k] for k in ("celeb_basis", "lidb")}, **kw)


class Killed(BaseException):
    """Stands for the process dying: not an Exception, so nothing in the job catches it."""


class DyingContext(JobContext):
    def __init__(self, *args, die_at: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.die_at = die_at

    def progress(self, fraction, message=None):
        super().progress(fraction, message)
        if message and f"step {self.die_at}/" in message:
            raise Killed()


def test_a_killed_celeb_basis_job_resumes_to_the_same_result(family, base_model, photos):
    handle = _identity(family, "ana")
    params = {"photos": photos, "base_model": str(base_model), "steps": 4,
              "checkpoint_every": 2, "seed": 5}
    q = _queue(family)
    # Uninterrupted reference run.
    job = q.submit("smiths", "celeb_basis", params, identity=handle)
    assert q.run_pending() == 1
    done = q.get(job["id"])
    assert done["status"] == "done", done
    reference = family.get_artifact(handle, "celeb_basis", purpose="generate").artifact
    assert done["result"]["resumed_from"] == 0
    assert reference.tensors["coefficients"].shape == (2, 512)
    with family.session() as s:  # the basis the artifact names is stored
        cb.load_basis(s, reference.metadata["basis_id"])

    # The same job again, killed after step 3 (its last checkpoint: step 2).
    job = q.submit("smiths", "celeb_basis", params, identity=handle)
    claimed = q.claim()
    row, lease, owner, ident = claimed
    ctx = DyingContext(q, row, owner, ident, lease.checkpoint, lease.attempts, die_at=3)
    with pytest.raises(Killed):
        REGISTRY["celeb_basis"].run(ctx)
    with family.session() as s:
        checkpoint = s.get(JobLease, job["id"]).checkpoint
    assert checkpoint["step"] == 2 and set(checkpoint) == {"step", "file", "sha256"}
    sealed = (Path(family.settings.data_dir) / "jobs" / checkpoint["file"]).read_bytes()
    assert b"mapper" not in sealed  # sealed with the identity's key, not plain torch.save
    # Another worker finds the stale lease and resumes from the checkpoint.
    q2 = _queue(family, lease_seconds=0.0)
    assert q2.run_pending() == 1
    resumed = q2.get(job["id"])
    assert resumed["status"] == "done", resumed
    assert resumed["result"]["resumed_from"] == 2 and resumed["attempts"] == 2
    again = family.get_artifact(handle, "celeb_basis", purpose="generate").artifact
    np.testing.assert_array_equal(again.tensors["coefficients"], reference.tensors["coefficients"])
    assert not (Path(family.settings.data_dir) / "jobs" / checkpoint["file"]).exists()


def test_consent_must_grant_personalize(family, base_model, photos):
    handle = _identity(family, "ben", purposes=("enroll", "generate"))
    q = _queue(family)
    job = q.submit("smiths", "lidb", {"photos": photos, "base_model": str(base_model)},
                   identity=handle)
    q.run_pending()
    doc = q.get(job["id"])
    assert doc["status"] == "failed" and "personalize" in doc["error"]


def test_params_are_checked(family):
    from vault.errors import InvalidInput

    handle = _identity(family, "cy")
    q = _queue(family)
    with pytest.raises(InvalidInput, match="photos"):
        q.submit("smiths", "celeb_basis", {"base_model": "x"}, identity=handle)
    with pytest.raises(InvalidInput, match="mode"):
        q.submit("smiths", "lidb", {"photos": ["a"], "base_model": "x", "mode": "slow"},
                 identity=handle)


def _cli():
    from web.cli.personalize import register

    group = click.Group("idvault")
    group.add_command(click.Group("artifact"))
    register(group)
    return group


def test_lidb_job_and_cli_export_load_into_diffusers(family, base_model, photos, tmp_path):
    from diffusers import StableDiffusionPipeline

    handle = _identity(family, "dee")
    runner = CliRunner()
    data = ["--data-dir", str(family.settings.data_dir)]
    for flag, url in (("--database-url", family.settings.database_url),
                      ("--keystore-url", family.settings.keystore_url)):
        if url:
            data += [flag, url]
    family.dispose()  # the CLI opens the vault itself
    args = ["personalize", handle, "--kind", "lidb", "--mode", "scratch", "--steps", "3",
            "--base-model", str(base_model), "--json", *data]
    for p in photos:
        args += ["--photos", p]
    result = runner.invoke(_cli(), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output[result.output.index("{"):])
    assert doc["result"]["rank"] == 1 and doc["result"]["layers"] == 136
    out = tmp_path / "dee_lora.safetensors"
    result = runner.invoke(_cli(), ["artifact", "export", handle, "--format", "diffusers-lora",
                                    "-o", str(out), "--base-model", str(base_model), *data],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o600
    pipe = StableDiffusionPipeline.from_pretrained(base_model)
    pipe.load_lora_weights(str(out))  # loads: every key lands on a module
    sd = safetensors.torch.load_file(str(out))
    assert len(sd) == 2 * 136
    from vault.vault import Vault

    with Vault.open(family.settings) as v:
        w = lidb.LidbWeights.from_artifact(v.get_artifact(handle, "lidb").artifact)
    # Scratch fit: rank 1, up_train moved off its zero init in 3 steps.
    assert w.rank == 1 and float(w.up_train.abs().max()) > 0
    # And a textual-inversion export refuses an identity without a Celeb Basis artifact.
    result = runner.invoke(_cli(), ["artifact", "export", handle, "--format",
                                    "textual-inversion", "-o", str(tmp_path / "x"), *data])
    assert result.exit_code != 0


def test_lidb_artifact_round_trips_the_codec():
    layers = [f"unet.l{i}" for i in range(4)]
    w = lidb.LidbWeights.init(layers, rank=2, seed=42)
    decoded = codec.decode(w.payload(model_id="m"), kind="lidb")
    back = lidb.LidbWeights.from_artifact(decoded)
    assert back.layers == layers and back.seed == 42 and back.rank == 2
    assert torch.equal(back.down_train, w.down_train)


def test_a_cancelled_job_stops_and_drops_its_checkpoint(family, base_model, photos):
    handle = _identity(family, "eve")
    q = _queue(family)
    job = q.submit("smiths", "lidb", {"photos": photos, "base_model": str(base_model),
                                      "mode": "scratch", "steps": 6, "checkpoint_every": 2},
                   identity=handle)

    class Cancelling(JobContext):
        def progress(self, fraction, message=None):
            if message and "step 3/" in message:
                q.cancel(job["id"])
            super().progress(fraction, message)

    row, lease, owner, ident = q.claim()
    ctx = Cancelling(q, row, owner, ident, lease.checkpoint, lease.attempts)
    from vault.jobs import JobCancelled

    with pytest.raises(JobCancelled):
        REGISTRY["lidb"].run(ctx)
    assert not list((Path(family.settings.data_dir) / "jobs").glob("*.ckpt"))
