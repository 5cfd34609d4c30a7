"""The README's commands work as written: the two install commands are the ones CI and
newcomers run, and the "Try it for real" block runs when pasted in order."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_exactly_the_readme_test_command():
    run, test = _readme_commands()
    assert "idvault demo" in run and "pytest" in test
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines


def test_install_commands_keep_torch_pinned():
    for command in _readme_commands():
        assert "-c constraints.txt" in command
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()


def _settings_table() -> dict[str, tuple[str, str]]:
    """The README's configuration table: variable -> (flag cell, default cell)."""
    text = (ROOT / "README.md").read_text().split("## Configuration", 1)[1]
    rows = {}
    for line in text.split("\n\n| flag |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]:
        flag, env, default = (cell.strip() for cell in line.strip("|").split("|", 2))
        for var in re.findall(r"IDVAULT_[A-Z_]+", env):
            rows[var] = (flag, default)
    return rows


def test_readme_settings_table_agrees_with_the_code():
    from encoders.face.pack import ENV_VAR, INSIGHTFACE_HOME
    from vault.config import ENV_VARS
    from web.cli.common import vault_options

    rows = _settings_table()
    assert set(rows) <= set(ENV_VARS.values()) | {ENV_VAR}, "a variable the code never reads"
    # Every vault option of every command (--data-dir, --key-file, ...) has its row.
    import click

    options = {p.opts[0] for p in vault_options(lambda **kw: None).__click_params__
               if isinstance(p, click.Option)}
    for opt in options:
        var = ENV_VARS[opt.removeprefix("--").replace("-", "_")]
        assert rows[var][0] == f"`{opt}`", (var, rows.get(var))
    # The models folder: every ML command and the server need it.
    flag, default = rows[ENV_VAR]
    assert flag.startswith("`--models`") and default.startswith(f"`{INSIGHTFACE_HOME}`")
    assert "idvault models tiny" in default


# -- "Try it for real": the README's block, run as a newcomer pastes it ------------------------
def _try_it_block() -> list[str]:
    """The command lines of the first ```sh block under the heading "Try it for real"."""
    text = (ROOT / "README.md").read_text()
    heading = re.search(r"^#+ Try it for real\s*$", text, re.M)
    assert heading, "README.md has no 'Try it for real' heading"
    block = re.search(r"```sh\n(.*?)```", text[heading.end():], re.S)
    assert block, "no ```sh block under 'Try it for real'"
    return [ln.strip() for ln in block.group(1).splitlines()
            if ln.strip() and not ln.strip().startswith("#")]


def _command(line: str) -> str:
    """'idvault identity delete smiths/ana --yes > r.json  # ...' -> 'identity delete', the
    command path in the click tree."""
    import click

    from web.cli.main import cli

    words = line.split("#")[0].split()
    assert words[:1] == ["idvault"], f"a README line that is not an idvault command: {line!r}"
    cmd, path = cli, []
    for word in words[1:]:
        if not isinstance(cmd, click.Group) or word not in cmd.commands:
            break
        cmd = cmd.commands[word]
        path.append(word)
    assert path and not isinstance(cmd, click.Group), f"no such command: {line!r}"
    return " ".join(path)


def _newcomer_env(home: Path) -> dict[str, str]:
    """A fresh user: an empty HOME, no idvault settings, the project venv's bin first on
    PATH (where `pip install -e .` put `idvault`)."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("IDVAULT_", "XDG_"))}
    env.update(HOME=str(home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    return env


@pytest.mark.slow
def test_try_it_for_real_block_runs_as_pasted(tmp_path):
    """Every line of the block exits 0 when pasted in order (stdin not a terminal, as in a
    script), and does what its comment says. `idvault serve` runs until stopped: it is
    started last with one change, `--port 0 --workers 1` (8080 may be taken on a test
    machine), and must answer; then it is stopped."""
    import json
    import os
    import signal
    import subprocess
    import time

    import requests

    lines = _try_it_block()
    commands = [_command(ln) for ln in lines]
    # The path a newcomer cares about is in the block: photos and models without Python,
    # enrollment with a kind generate reads, generation, erasure with a receipt, the server.
    for needed in ("models tiny", "init", "enroll", "generate", "identity delete",
                   "receipt verify", "serve"):
        assert needed in commands, f"the README block has no `idvault {needed}` line"
    assert commands[-1] == "serve", "serve runs until stopped: it must be the last line"
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = _newcomer_env(home)
    outputs = {}
    for line, command in zip(lines[:-1], commands[:-1], strict=True):
        done = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=300)
        assert done.returncode == 0, (f"README line failed (exit {done.returncode}): "
                                      f"{line}\n{done.stdout}\n{done.stderr}")
        assert "Traceback" not in done.stderr, done.stderr
        outputs[command] = done.stdout

    assert (home / ".local/share/idvault/vault.db").is_file(), "init used no temp HOME"
    assert "photos of ana, ben" in outputs["models tiny"]
    assert "enrolled smiths/ana" in outputs["enroll"] and "photomaker" in outputs["enroll"]
    assert outputs["verify-face"].startswith("same:")
    assert "via photomaker" in outputs["generate"] and (work / "ana.png").is_file()
    assert outputs["verify"].startswith("ana.png: valid")
    receipt = json.loads((work / "r.json").read_text())  # the receipt alone, no prompt
    assert receipt["receipt"]["handle"] == "smiths/ana"
    assert outputs["receipt verify"].startswith("valid receipt: smiths/ana erased at")
    gone = subprocess.run(["bash", "-c", "idvault identity show smiths/ana"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=120)
    assert gone.returncode == 6 and "smiths/ana" in gone.stderr, gone.stderr

    serve = lines[-1].split("#")[0].strip() + " --port 0 --workers 1 --threads 2"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", "-c", f"exec {serve}"], cwd=work, env=env,
                                stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None and proc.poll() is None and time.monotonic() < deadline:
            found = re.search(r"serving on (http://127\.0\.0\.1:\d+/)", log.read_text())
            url = found and found.group(1)
            time.sleep(0.2)  # polling the log, not an assertion
        assert url, f"serve did not start (exit {proc.poll()}):\n{log.read_text()}"
        assert requests.get(url + "v1/health", timeout=30).json() == {"status": "ok"}
        assert requests.get(url + "login", timeout=30).status_code == 200
        assert "one-time password" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
