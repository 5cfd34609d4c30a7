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

from vault import accounts
from web.cli.main import main


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
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped" in out
    # The second start: no new password, says how to sign in.
    proc, url, lines = start()
    try:
        assert "sign in with your account" in "".join(lines)
        assert "one-time password" not in "".join(lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
