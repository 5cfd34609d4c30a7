"""The idvault CLI: the contract commands, exit codes, errors without tracebacks."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import consent_doc, face_payload
from web.cli.main import main


@pytest.fixture
def run(tmp_path, capsys):
    data = str(tmp_path / "vault")

    def _run(*args: str, code: int = 0) -> tuple[str, str]:
        rc = main([*args, "--data-dir", data])
        out, err = capsys.readouterr()
        assert rc == code, f"exit {rc} (wanted {code}); stderr: {err}"
        assert "Traceback" not in err
        return out, err

    _run.data = data  # type: ignore[attr-defined]
    return _run


@pytest.fixture
def ready(run, tmp_path):
    run("init")
    run("owner", "add", "smiths", "--kind", "family")
    path = tmp_path / "consent.json"
    path.write_text(json.dumps(consent_doc()))
    run("identity", "add", "smiths/ana", "--consent", str(path))
    return run


def test_init_says_to_back_up_the_key_file_and_where_it_is(tmp_path, capsys, monkeypatch):
    key = tmp_path / "keys" / "family.key"
    assert main(["init", "--data-dir", str(tmp_path / "v1"), "--key-file", str(key)]) == 0
    out = capsys.readouterr().out
    assert key.is_file() and f"back up the key file now: {key}" in out
    assert "nothing in this vault can be decrypted" in out
    # The env provider has no file: it says which variable holds the key instead.
    monkeypatch.setenv("IDVAULT_KEK", "A" * 43 + "=")
    assert main(["init", "--data-dir", str(tmp_path / "v2"), "--key-provider", "env"]) == 0
    out = capsys.readouterr().out
    assert "keep a copy of the key in IDVAULT_KEK" in out and "key file" not in out


def test_contract_flow(ready, tmp_path):
    run = ready
    face = tmp_path / "face.safetensors"
    face.write_bytes(face_payload(photos=3))
    out, _ = run("artifact", "put", "smiths/ana", "face", str(face))
    assert "stored face artifact" in out
    out, _ = run("identity", "list", "--json")
    assert [i["handle"] for i in json.loads(out)] == ["smiths/ana"]
    shown = json.loads(run("identity", "show", "smiths/ana", "--json")[0])
    assert shown["artifacts"][0]["shapes"]["normed"] == [3, 512]
    got = tmp_path / "out.safetensors"
    run("artifact", "get", "smiths/ana", "face", "-o", str(got), "--purpose", "generate")
    assert got.read_bytes() == face.read_bytes() and (got.stat().st_mode & 0o777) == 0o600
    kinds = json.loads(run("artifact", "kinds", "--json")[0])
    assert set(kinds) == {"face", "photomaker", "storymaker", "faceid", "instantid",
                          "celeb_basis", "lidb"}
    assert "rotated: KEK version 2 active" in run("keys", "rotate")[0]
    assert "1 identities, 3 vectors" in run("index", "rebuild")[0]
    assert "audit chain intact" in run("audit", "verify")[0]
    receipt_file = tmp_path / "receipt.json"
    out, _ = run("identity", "delete", "smiths/ana", "--yes", "-o", str(receipt_file))
    assert json.loads(out)["receipt"]["handle"] == "smiths/ana"
    assert "valid receipt: smiths/ana" in run("receipt", "verify", str(receipt_file))[0]
    assert run("identity", "list")[0].strip() == "no identities"


@pytest.mark.parametrize("args, code, message", [
    (("identity", "show", "smiths/nobody"), 6, "no identity smiths/nobody"),
    (("identity", "show", "Smiths/ana"), 8, "lowercase"),
    (("owner", "add", "smiths", "--kind", "family"), 7, "already exists"),
    (("artifact", "get", "smiths/ana", "face", "-o", "x", "--purpose", "generate"), 6,
     "has no face artifact"),
    (("artifact", "get", "smiths/ana", "face", "-o", "x", "--purpose", "share"), 5,
     "does not grant 'share'"),
    (("identity", "delete", "smiths/ana"), 2, "pass --yes"),
])
def test_errors_are_one_line_with_exit_codes(ready, args, code, message):
    _, err = ready(*args, code=code)
    assert message in err


def test_bad_artifact_file_is_refused(ready, tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x80\x04" + b"\x00" * 64)
    _, err = ready("artifact", "put", "smiths/ana", "face", str(bad), code=8)
    assert err.startswith("error: payload is a pickle")


def test_no_vault_and_wrong_key(run, tmp_path):
    _, err = run("identity", "list", code=6)
    assert "run `idvault init`" in err
    run("init")
    key = tmp_path / "vault" / "master.key"
    doc = json.loads(key.read_text())
    doc["keys"]["1"] = "A" * 43 + "="
    key.write_text(json.dumps(doc))
    _, err = run("owner", "add", "x", "--kind", "family", code=4)
    assert "does not match this vault" in err


def test_audit_verify_exits_nonzero_on_tampering(ready):
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{ready.data}/vault.db")
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2"))
    engine.dispose()
    _, err = ready("audit", "verify", code=3)
    assert "audit chain broken at event 2" in err


def test_console_script_runs_as_a_process(tmp_path):
    env = {**os.environ, "IDVAULT_DATA_DIR": str(tmp_path / "v")}
    out = subprocess.run([sys.executable, "-m", "web.cli.main", "init"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "initialised vault" in out.stdout
    again = subprocess.run([sys.executable, "-m", "web.cli.main", "init"], env=env,
                           capture_output=True, text=True)
    assert again.returncode == 7 and again.stderr.startswith("error: a vault already exists")


def test_demo_runs_and_prints_only_its_own_lines(tmp_path):
    # A process of its own: the ML libraries' notices and progress bars show once per process.
    # Its temporary folder goes under tmp_path (TMPDIR), where we can see it is removed.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    run = subprocess.run([sys.executable, "-m", "web.cli.main", "demo"], capture_output=True,
                         text=True, env={**os.environ, "TERM": "xterm", "TMPDIR": str(tmp)})
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # no third-party warning or progress bar
    out = run.stdout
    assert [ln for ln in out.splitlines() if ln.strip()][0].startswith("[1] offline models")
    assert "refused: these photos match smiths/ana" in out
    assert "held: resembles smiths/cleo" in out and "accepted: smiths/dan is active" in out
    assert "ben_new_20.png vs smiths/ana: different" in out
    assert "closest is now smiths/dan (new)" in out and "chain intact: True" in out
    folder = re.search(r"removed the demo folder (\S+) \((\d+) MB\)", out)
    assert folder and Path(folder.group(1)).parent == tmp and int(folder.group(2)) > 0, out
    assert list(tmp.glob("idvault-demo-*")) == []  # nothing left behind
    assert "--keep" in out and "export IDVAULT_DATA_DIR" not in out  # no tour of a gone folder


def _fake_narration(monkeypatch, fail: bool = False):
    """The demo's narration replaced by one that writes a file (and fails if asked): these
    tests are about the folder's fate, which the real run above covers for the default."""
    from web.cli import demo

    def narrate(data_dir):
        (data_dir / "vault").mkdir(parents=True)
        (data_dir / "vault" / "vault.db").write_bytes(b"x" * 3_000_000)
        if fail:
            raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_narrate", narrate)


def test_demo_keep_keeps_its_folder_and_says_where(tmp_path, monkeypatch, capsys):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _fake_narration(monkeypatch)
    assert main(["demo", "--keep"]) == 0
    out = capsys.readouterr().out
    [folder] = tmp_path.glob("idvault-demo-*")
    assert (folder / "vault" / "vault.db").is_file()
    assert f"export IDVAULT_DATA_DIR={folder / 'vault'}" in out and f"kept {folder}" in out


def test_demo_never_removes_a_folder_the_user_named(tmp_path, monkeypatch, capsys):
    _fake_narration(monkeypatch)
    assert main(["demo", "--data-dir", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "vault" / "vault.db").is_file()
    assert "removed" not in capsys.readouterr().out


def test_demo_removes_its_folder_even_when_interrupted(tmp_path, monkeypatch, capsys):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _fake_narration(monkeypatch, fail=True)
    assert main(["demo"]) == 1  # click turns Ctrl-C into its Abort: "aborted", exit 1
    out = capsys.readouterr().out
    assert list(tmp_path.glob("idvault-demo-*")) == []
    assert re.search(rf"removed the demo folder {re.escape(str(tmp_path))}/idvault-demo-\S+ "
                     r"\(3 MB\)", out), out
