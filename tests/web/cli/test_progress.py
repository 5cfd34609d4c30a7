"""The ML commands are never silent: they say what loads and how far each phase got.

With the tiny stand-in models (``idvault models tiny``): ``generate`` without a terminal
prints a line per load and per phase, ``--progress json`` one parseable object per
step; ``personalize`` without CUDA refuses a default-length fit before the base model
loads, with the expected time; it loads the base model once and runs only its own job;
Ctrl-C cancels its fit at the next step, with the project's lowercase error.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
from PIL import Image

from encoders.standins.synthetic_faces import synthetic_face
from tests.helpers import consent, consent_doc, face_payload
from tests.web.test_imports import ROOT
from web.cli.main import main


@pytest.fixture
def backend() -> str:
    """What these tests check is the commands' output, the same on either database (the
    job queue itself runs on both in tests/vault/test_jobs.py)."""
    return "sqlite"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress-models")
    assert main(["models", "tiny", str(root)]) == 0
    return root


@pytest.fixture
def one_torch_thread():
    """Tiny fits on one torch thread (see tests/encoders/conftest.py: ~50x faster here)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, as the CPU-only checks of personalize expect (also on a GPU
    machine)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _run(capsys, *args: str, code: int = 0) -> tuple[str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    assert rc == code, f"exit {rc} (wanted {code}); stdout: {out}; stderr: {err}"
    assert "Traceback" not in err
    return out, err


# -- generate and enroll -------------------------------------------------------------------
@pytest.fixture
def enrolled(tmp_path, capsys, models, monkeypatch):
    """A vault with northlight/ana enrolled (face, photomaker); the enroll's stderr."""
    monkeypatch.setenv("IDVAULT_MODELS", str(models))
    data = ["--data-dir", str(tmp_path / "vault")]
    _run(capsys, "init", *data)
    _run(capsys, "owner", "add", "northlight", "--kind", "studio", *data)
    (tmp_path / "c.json").write_text(json.dumps(consent_doc()))
    photos = []
    for i in range(2):
        photos.append(str(tmp_path / f"ana_{i}.png"))
        Image.fromarray(synthetic_face(1, i)).save(photos[-1])
    _, err = _run(capsys, "enroll", "northlight/ana", *photos, "--consent",
                  str(tmp_path / "c.json"), "--kinds", "face,photomaker", *data)
    return {"data": data, "dir": tmp_path, "enroll_err": err}


def test_enroll_and_generate_without_a_terminal_say_what_loads_and_each_phase(enrolled,
                                                                              capsys):
    lines = enrolled["enroll_err"].splitlines()
    # capsys' stderr is no terminal: lines, not bars.
    assert "enroll: loading face models (buffalo_l)..." in lines
    assert "enroll: analysing photos..." in lines
    assert any(re.fullmatch(r"enroll: analysing photos: done in \d+\.\d s", x) for x in lines)

    out_png = enrolled["dir"] / "a.png"
    out, err = _run(capsys, "generate", "@northlight/ana reading", "--steps", "3", "--seed",
                    "1", "-o", str(out_png), *enrolled["data"])
    assert out.startswith(f"wrote {out_png}")
    lines = err.splitlines()
    # What loads, in order, then the denoising phase's start and end.
    expected = ["generate: loading torch...", "generate: loading base model sdxl-tiny (fp",
                "generate: denoising 3 steps...", "generate: denoised in "]
    at = [next(i for i, x in enumerate(lines) if x.startswith(e)) for e in expected]
    assert at == sorted(at), err
    assert re.fullmatch(r"generate: loading base model sdxl-tiny \(fp(16|32)\)\.\.\.",
                        lines[at[1]])
    assert re.fullmatch(r"generate: denoised in \d+\.\d s", lines[at[3]])
    assert "\r" not in err  # no bar redrawn into a log


def test_generate_progress_json_has_one_object_per_step(enrolled, capsys):
    out, err = _run(capsys, "generate", "@northlight/ana reading", "--steps", "4", "--seed",
                    "2", "-o", str(enrolled["dir"] / "b.png"), "--progress", "json",
                    *enrolled["data"])
    events = [json.loads(x) for x in err.splitlines()]  # every stderr line is JSON
    assert all(e["command"] == "generate" and "elapsed_s" in e for e in events)
    assert events[0] == {**events[0], "phase": "load", "message": "loading torch..."}
    steps = [e for e in events if e.get("phase") == "denoise" and "eta_s" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(e["total"] == 4 for e in steps)
    assert steps[0]["eta_s"] is None  # no rate from one step
    assert all(e["eta_s"] >= 0 for e in steps[1:])
    elapsed = [e["elapsed_s"] for e in events]
    assert elapsed == sorted(elapsed)
    assert events[-1]["phase"] == "denoise" and events[-1]["done"] is True
    assert out.startswith("wrote ")  # stdout stays the result


# -- personalize ---------------------------------------------------------------------------
def _identity(vault, name: str) -> str:
    handle = f"smiths/{name}"
    vault.create_identity(handle, consent(purposes=["enroll", "generate", "personalize"]),
                          actor="test")
    vault.put_artifact(handle, "face", face_payload(seed=3), actor="test")
    return handle


def _data_args(vault) -> list[str]:
    args = ["--data-dir", str(vault.settings.data_dir)]
    for flag, url in (("--database-url", vault.settings.database_url),
                      ("--keystore-url", vault.settings.keystore_url)):
        if url:
            args += [flag, url]
    return args


@pytest.fixture
def fit(family, models, tmp_path):
    """An identity to fit, its photo, the tiny SDXL base model and the CLI's vault args."""
    handle = _identity(family, "ana")
    photo = tmp_path / "ana.png"
    Image.fromarray(synthetic_face(1, 0)).save(photo)
    return {"vault": family, "handle": handle, "base": str(models / "sdxl-tiny"),
            "args": ["--photos", str(photo), "--base-model", str(models / "sdxl-tiny"),
                     *_data_args(family)]}


@pytest.fixture
def loads(monkeypatch):
    """Every base model load of a fit, counted in-process."""
    from encoders.fitting import core

    calls: list[str] = []
    load = core.DiffusionModel.from_pretrained.__func__

    def counting(cls, folder, **kw):
        calls.append(str(folder))
        return load(cls, folder, **kw)

    monkeypatch.setattr(core.DiffusionModel, "from_pretrained", classmethod(counting))
    return calls


def _jobs(vault) -> list[dict]:
    from vault.jobs import JobQueue

    return JobQueue(vault).list("smiths")


def test_personalize_without_cuda_refuses_a_default_fit_before_loading(fit, loads, no_cuda,
                                                                      capsys):
    _, err = _run(capsys, "personalize", fit["handle"], "--kind", "celeb_basis", *fit["args"],
                  code=8)
    assert re.search(r"error: celeb_basis runs 400 steps; without CUDA, on this CPU, that "
                     r"takes about [\d.]+ (s|min|h)", err), err
    assert "pass --steps N for a shorter fit or --yes to run it anyway" in err
    assert loads == [] and _jobs(fit["vault"]) == []  # refused before any load or job


def test_personalize_loads_the_base_model_once_and_runs_only_its_own_job(
        fit, loads, no_cuda, one_torch_thread, capsys):
    import encoders.fitting.jobs  # noqa: F401  (registers the job kinds)
    from vault.jobs import REGISTRY, JobQueue

    # An older queued job of the same kind (from the web UI, or a run killed earlier):
    # the command must not run it first, loading the base model a second time.
    older = JobQueue(fit["vault"], registry={"lidb": REGISTRY["lidb"]}).submit(
        "smiths", "lidb", {"photos": [fit["args"][1]], "base_model": fit["base"],
                           "steps": 2}, identity=fit["handle"])
    out, err = _run(capsys, "personalize", fit["handle"], "--kind", "lidb", "--steps", "2",
                    "--json", *fit["args"])
    doc = json.loads(out)
    assert doc["status"] == "done" and doc["id"] != older["id"]
    assert loads == [fit["base"]]
    assert {j["id"]: j["status"] for j in _jobs(fit["vault"])}[older["id"]] == "queued"
    assert "personalize: loading base model sdxl-tiny..." in err.splitlines()
    assert any(re.fullmatch(r"personalize: fitted in \d+\.\d s", x) for x in err.splitlines())


def test_personalize_with_yes_says_the_expected_time_before_it_starts(fit, no_cuda,
                                                                     one_torch_thread, capsys,
                                                                     monkeypatch):
    from encoders.fitting import estimate

    # A 40-step LiDB fast fit at the real SD1.5 per-step cost, as --yes on a CPU shows it.
    monkeypatch.setattr(estimate, "cpu_seconds_per_step", lambda folder: 14.2)
    _, err = _run(capsys, "personalize", fit["handle"], "--kind", "lidb", "--yes",
                  "--progress", "json", *fit["args"])
    events = [json.loads(x) for x in err.splitlines()]
    said = next(e for e in events if e["phase"] == "estimate")["message"]
    assert said.startswith("lidb runs 40 steps; without CUDA, on this CPU, that takes about "
                           "9 min (roughly 14 s a step for sdxl-tiny)")
    steps = [e["step"] for e in events if e["phase"] == "fit" and "eta_s" in e]
    assert steps == sorted(steps) and steps[-1] == 40
    assert next(e for e in events if e["phase"] == "fit")["total"] == 40


def test_default_steps_match_the_fit_configs():
    from encoders.fitting import lidb
    from encoders.fitting.core import FitConfig
    from encoders.fitting.estimate import default_steps

    assert default_steps("celeb_basis") == FitConfig().steps
    assert default_steps("lidb", "fast") == lidb.FAST_FIT.steps
    assert default_steps("lidb", "scratch") == lidb.SCRATCH_FIT.steps


def test_ctrl_c_cancels_the_fit_at_its_next_step(fit):
    """SIGINT after the first step line: the job stops at the step after the one it had
    reached when the cancel was recorded, the command says so in lowercase and exits 130."""
    total = 400
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    fit["vault"].dispose()  # the subprocess opens the vault itself
    proc = subprocess.Popen(
        [sys.executable, "-m", "web.cli.main", "personalize", fit["handle"], "--kind", "lidb",
         "--mode", "scratch", "--steps", str(total), "--progress", "json", *fit["args"]],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            event = json.loads(line)
            if event["phase"] == "fit" and event.get("step", 0) >= 1:
                proc.send_signal(signal.SIGINT)
                break
        _, rest = proc.communicate(timeout=300)
        lines += rest.splitlines(keepends=True)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(lines)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Error:" not in err
    cancel = next(json.loads(x) for x in lines if '"phase": "cancel"' in x)
    at = int(re.search(r"at step (\d+) of", cancel["message"])[1])
    final = re.search(r"^error: job (\S+) cancelled at step (\d+) of 400 \(nothing was "
                      r"stored\)$", err, re.M)
    assert final, err
    job_id, stopped = final[1], int(final[2])
    # The fit checks for a cancel after every step: it stops after the step under way when
    # the cancel was recorded (on PostgreSQL, a step whose progress write was waiting on
    # the cancel's row lock still counts: one more).
    assert at <= stopped <= at + 2 < total
    from encoders.fitting.jobs import fit_step
    from vault.errors import NotFound
    from vault.jobs import JobQueue
    from vault.vault import Vault

    with Vault.open(fit["vault"].settings) as v:
        job = JobQueue(v).get(job_id)
        assert job["status"] == "cancelled"
        assert fit_step(job["progress"], total) == stopped
        with pytest.raises(NotFound):
            v.get_artifact(fit["handle"], "lidb", purpose="generate")


# -- the reporter itself, on a fake clock --------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_say_the_expected_time_after_two_steps_and_then_every_30_s(monkeypatch):
    import io

    from web.cli import progress as progress_mod

    clock = Clock()
    monkeypatch.setattr(progress_mod.time, "monotonic", clock)
    out = io.StringIO()  # not a terminal
    report = progress_mod.Progress("personalize", stream=out)
    phase = report.phase("fit", start="fitting {total} steps", done="fitted", estimate=True)
    clock.now += 50  # loading: not a step, does not count in the rate
    for step in range(1, 401):
        phase(step, 400)
        clock.now += 14.0
    phase.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "personalize: fitting 400 steps..."
    # Two steps timed (14 s each): the rate and the whole fit's expected time.
    assert lines[1] == ("personalize: fit: 14.00 s a step; 400 steps take about 1 h 33 min, "
                        "1 h 33 min left")
    # Then a line per 30 s at most (every third 14 s step), each with the time left.
    assert lines[2] == "personalize: fit: step 6/400, about 1 h 32 min left"
    assert len(lines) == 2 + len(range(6, 400, 3)) + 1
    # 400 steps from the first one timed: 399 intervals of 14 s.
    assert lines[-1] == "personalize: fitted in 1 h 33 min"


def test_json_steps_carry_the_time_left(monkeypatch):
    import io

    from web.cli import progress as progress_mod

    clock = Clock()
    monkeypatch.setattr(progress_mod.time, "monotonic", clock)
    out = io.StringIO()
    phase = progress_mod.Progress("generate", "json", stream=out).phase(
        "denoise", start="denoising {total} steps", done="denoised")
    for step in range(1, 5):
        phase(step, 4)
        clock.now += 2.0
    phase.close(took=8.0)
    events = [json.loads(x) for x in out.getvalue().splitlines()]
    steps = [e for e in events if "eta_s" in e]
    assert [(e["step"], e["eta_s"]) for e in steps] == [(1, None), (2, 4.0), (3, 2.0), (4, 0.0)]
    assert events[-1]["took_s"] == 8.0 and events[-1]["done"] is True
    assert progress_mod.duration(41.24) == "41.2 s"
    assert progress_mod.duration(5000) == "83 min"
    assert progress_mod.duration(6000) == "1 h 40 min"
