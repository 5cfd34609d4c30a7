"""idvault serve, user and apikey."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests
from argon2 import PasswordHasher

from tests.helpers import consent_doc
from vault import accounts
from vault.errors import InvalidInput
from web.cli.main import main
from web.serve import default_workers


@pytest.fixture
def cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(accounts, "hasher",
                        PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    data = str(tmp_path / "vault")

    def run(*args: str, code: int = 0, stdin: str | None = None):
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(stdin))
        rc = main([*args, "--data-dir", data])
        out, err = capsys.readouterr()
        assert rc == code, f"exit {rc} (wanted {code}); stderr: {err}"
        assert "Traceback" not in err
        return out, err

    run("init")
    run("owner", "add", "smiths", "--kind", "family")
    run.data = data  # type: ignore[attr-defined]
    return run


def test_user_commands(cli):
    out, _ = cli("user", "add", "maria", "--owner", "smiths", "--role", "admin")
    assert "created user maria, admin of smiths" in out
    password = re.search(r"one-time password .*: (\S+)", out).group(1)
    assert len(password) >= 20
    out, _ = cli("user", "add", "ben", "--password-stdin", stdin="ben's long password\n")
    assert "one-time" not in out
    _, err = cli("user", "add", "ben", code=7)
    assert "already exists" in err
    _, err = cli("user", "add", "x", code=8)
    assert "username" in err
    _, err = cli("user", "add", "weak-user", "--password-stdin", stdin="short\n", code=8)
    assert "at least 10" in err
    cli("user", "grant", "ben", "smiths", "--role", "viewer")
    rows = json.loads(cli("user", "list", "--json")[0])
    assert {r["username"]: [m["role"] for m in r["memberships"]] for r in rows} == {
        "ben": ["viewer"], "maria": ["admin"]}
    assert "argon2" not in json.dumps(rows) and "password_hash" not in json.dumps(rows)
    out, _ = cli("user", "list")
    assert "smiths:viewer" in out
    cli("user", "revoke", "ben", "smiths")
    _, err = cli("user", "revoke", "ben", "smiths", code=6)
    out, _ = cli("user", "passwd", "ben")
    assert "one-time password" in out and "signed out" in out
    cli("user", "add", "root-user", "--superuser")
    cli("user", "delete", "root-user")
    _, err = cli("user", "delete", "root-user", code=6)


def test_cli_audit_actor_is_the_os_account_without_user(cli, monkeypatch):
    import pwd

    from vault import audit
    from vault.config import Settings
    from vault.vault import Vault

    monkeypatch.delenv("USER", raising=False)  # as under cron, systemd or `env -i`
    cli("user", "add", "zed-user")
    with Vault.open(Settings.from_env(data_dir=cli.data)) as v, v.session() as s:
        actor = [e.actor for e in audit.events(s) if e.action == "user.create"][-1]
    assert actor == f"cli:{pwd.getpwuid(os.getuid()).pw_name}" and actor != "cli:unknown"


def test_apikey_commands(cli):
    out, _ = cli("apikey", "create", "smiths", "--name", "render farm", "--scope",
                 "identities:read", "--scope", "generate", "--expires-days", "30")
    token = re.search(r"^(idv_\S+)$", out, re.MULTILINE).group(1)
    assert "shown once" in out and "expires" in out
    doc = json.loads(cli("apikey", "create", "smiths", "--name", "ci", "--scope", "admin",
                         "--json")[0])
    assert doc["token"].startswith("idv_") and doc["key"]["scopes"] == ["admin"]
    rows = json.loads(cli("apikey", "list", "--json")[0])
    assert [r["name"] for r in rows] == ["render farm", "ci"]
    assert token not in json.dumps(rows)
    out, _ = cli("apikey", "revoke", rows[0]["prefix"])
    assert "revoked" in out
    _, err = cli("apikey", "revoke", rows[0]["prefix"], code=7)
    _, err = cli("apikey", "revoke", "nope", code=6)
    out, _ = cli("apikey", "list", "smiths")
    assert "revoked" in out
    cli("apikey", "create", "nobody", "--name", "x", "--scope", "admin", code=6)
    cli("apikey", "create", "smiths", "--name", "x", "--scope", "root", code=2)


@pytest.mark.slow
def test_serve_prints_how_to_sign_in_and_serves(cli, tmp_path):
    env = {**os.environ, "IDVAULT_DEBUG": ""}
    cmd = [sys.executable, "-m", "web.cli.main", "serve", "--data-dir", cli.data, "--port", "0",
           "--threads", "2"]

    def start():
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=os.getcwd())
        lines, url = [], None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+/)", line)
            if m:
                url = m.group(1)
            if url and ("sign in" in line):
                break
        assert url, "".join(lines)
        return proc, url, lines

    proc, url, lines = start()
    try:
        text = "".join(lines)
        while "not shown again" not in text:
            text += proc.stdout.readline()
        assert "waitress" in text and "first start: created the superuser 'admin'" in text
        password = re.search(r"one-time password:\n\s+(\S+)", text).group(1)
        assert requests.get(url + "v1/health", timeout=10).json() == {"status": "ok"}
        s = requests.Session()
        page = s.get(url + "login", timeout=10).text
        token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        resp = s.post(url + "login", data={"username": "admin", "password": password,
                                           "csrf_token": token}, timeout=10,
                      allow_redirects=False)
        assert resp.status_code == 302 and resp.headers["Location"] == "/account"
        assert "HttpOnly" in resp.headers["Set-Cookie"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)  # past the supervisor's own 30 s reap deadline
    assert proc.returncode == 0 and "stopped" in out
    # The second start: no new password, says how to sign in.
    proc, url, lines = start()
    try:
        assert "sign in with your account" in "".join(lines)
        assert "one-time password" not in "".join(lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


# -- several server processes ----------------------------------------------------------------
def test_worker_count_setting():
    assert default_workers({}) == max(1, min(os.cpu_count() or 1, 4))
    assert default_workers({"IDVAULT_WEB_WORKERS": " 3 "}) == 3
    for bad in ("many", "0", "65", "-1", "2.5"):
        with pytest.raises(InvalidInput, match="IDVAULT_WEB_WORKERS"):
            default_workers({"IDVAULT_WEB_WORKERS": bad})


def test_serve_refuses_a_bad_worker_count_before_listening(cli, monkeypatch):
    monkeypatch.setenv("IDVAULT_WEB_WORKERS", "many")
    out, err = cli("serve", "--port", "0", code=8)
    assert "IDVAULT_WEB_WORKERS='many' is not an integer" in err and "serving" not in out
    monkeypatch.delenv("IDVAULT_WEB_WORKERS")
    _, err = cli("serve", "--port", "0", "--workers", "0", code=2)
    assert "--workers" in err


def test_serve_on_a_busy_port_names_the_port_and_what_to_do(cli):
    import socket

    with socket.socket() as holder:  # another process's server, as far as serve can tell
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        # --workers 2: the port is tried before any app is built
        out, err = cli("serve", "--port", str(port), "--workers", "2", code=7)
    assert f"port {port} is already in use on 127.0.0.1" in err
    assert "--port" in err and "stop that process" in err
    assert "OSError" not in err and "Errno" not in err and "serving" not in out


def _workers_of(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True, check=False).stdout  # exit 1: no such process
    return {int(p) for p in out.split()}


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait(what, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Served:
    """`idvault serve --workers N` as a real process, its output in a file."""

    def __init__(self, data: str, log, workers: int = 2) -> None:
        self.log = log
        out = open(log, "w")  # noqa: SIM115 - the server writes it until it ends
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "web.cli.main", "serve", "--data-dir", data, "--port", "0",
             "--workers", str(workers), "--threads", "2"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "IDVAULT_DEBUG": ""},
            cwd=os.getcwd(), start_new_session=True)
        self.url = _wait(lambda: re.search(r"serving on (http://127\.0\.0\.1:\d+/)",
                                           self.text()), 60).group(1)
        self.workers = _wait(lambda: len(_workers_of(self.proc.pid)) == workers
                             and _workers_of(self.proc.pid))
        _wait(lambda: self.fresh("v1/health").status_code == 200)

    def text(self) -> str:
        return open(self.log).read()

    def fresh(self, path: str, token: str | None = None) -> requests.Response:
        """A request on a new connection: the kernel hands it to any worker."""
        headers = {"Authorization": f"Bearer {token}", "Connection": "close"} if token else {
            "Connection": "close"}
        return requests.get(self.url + path, headers=headers, timeout=30)

    def statuses(self, path: str, token: str, n: int = 20) -> set[int]:
        return {self.fresh(path, token).status_code for _ in range(n)}

    def kill_all(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.mark.slow
def test_serve_workers_see_every_change_at_once_and_stop_cleanly(cli, tmp_path):
    doc = tmp_path / "consent.json"
    doc.write_text(json.dumps(consent_doc()))
    cli("owner", "add", "studio", "--kind", "studio", "--erase-policy", "retain")
    for handle in ("smiths/ana", "smiths/ben", "studio/sol"):
        cli("identity", "add", handle, "--consent", str(doc))
    keys = {owner: json.loads(cli("apikey", "create", owner, "--name", "k", "--scope",
                                  "identities:read", "--json")[0]) for owner in ("smiths",
                                                                                 "studio")}
    smiths, studio = keys["smiths"]["token"], keys["studio"]["token"]
    served = Served(cli.data, tmp_path / "serve.log")
    try:
        assert "(waitress, 2 workers x 2 threads)" in served.text()
        assert served.statuses("v1/identities/smiths/ana", smiths) == {200}
        assert served.statuses("v1/identities/smiths/ana", studio) == {404}  # tenancy
        # Changes made by another process are seen by the next request of every worker.
        cli("identity", "delete", "smiths/ana", "--yes")
        assert served.statuses("v1/identities/smiths/ana", smiths) == {404}
        cli("consent", "withdraw", "studio/sol")
        assert {served.fresh("v1/identities/studio/sol/consent", studio).json()["status"]
                for _ in range(20)} == {"withdrawn"}
        cli("apikey", "revoke", keys["smiths"]["key"]["prefix"])
        assert served.statuses("v1/identities/smiths/ben", smiths) == {401}
        # A worker that dies is replaced.
        first = served.workers
        os.kill(min(first), signal.SIGKILL)
        replaced = _wait(lambda: (w := _workers_of(served.proc.pid)) and len(w) == 2
                         and w != first and w)
        assert max(first) in replaced
        assert served.fresh("v1/health").status_code == 200
        # SIGTERM stops every worker, then the parent.
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(60) == 0
        assert "stopped" in served.text() and "Traceback" not in served.text()
        assert "did not stop" not in served.text()  # none had to be killed
        assert not [pid for pid in first | replaced if _running(pid)]
    finally:
        served.kill_all()


@pytest.mark.slow
def test_serve_workers_stop_even_while_one_is_starting(cli, tmp_path):
    for attempt in range(3):  # the new worker is caught at a different point each time
        served = Served(cli.data, tmp_path / f"{attempt}.log")
        try:
            first = served.workers
            os.kill(min(first), signal.SIGKILL)
            new = _wait(lambda s=served, f=first: _workers_of(s.proc.pid) - f, 30)  # starting
            served.proc.send_signal(signal.SIGTERM)
            assert served.proc.wait(60) == 0
            assert "did not stop" not in served.text(), served.text()
            assert not [pid for pid in first | new if _running(pid)]
        finally:
            served.kill_all()


@pytest.mark.slow
def test_serve_workers_stop_on_ctrl_c_and_when_the_parent_is_killed(cli, tmp_path):
    served = Served(cli.data, tmp_path / "a.log")
    try:
        os.killpg(served.proc.pid, signal.SIGINT)  # Ctrl-C: the whole process group
        assert served.proc.wait(30) == 0
        assert not [pid for pid in served.workers if _running(pid)]
        assert "Traceback" not in served.text() and "KeyboardInterrupt" not in served.text()
    finally:
        served.kill_all()
    served = Served(cli.data, tmp_path / "b.log")
    try:
        served.proc.kill()  # the parent only, with no chance to stop its workers
        served.proc.wait(10)
        _wait(lambda: not [pid for pid in served.workers if _running(pid)], 15)
    finally:
        served.kill_all()
