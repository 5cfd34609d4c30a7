"""Sign-in hardening (issue 17): strong passwords, a throttle every process shares, per
account and address, and one-time-password sessions that can only change the password."""

from __future__ import annotations

import io
import os
import re
import sys

import pytest
import requests

from tests.helpers import consent_doc
from tests.web.deployment import Deployment
from tests.web.web_fixtures import PASSWORD, SECRET, Web
from vault import accounts
from vault.errors import InvalidInput
from vault.identities import list_identities
from web.app import WebConfig, create_app
from web.cli.main import main

A, B = "203.0.113.7", "198.51.100.9"
WEAK = {
    "          ": "more than spaces",
    "aaaaaaaaaa": 'repeats like "aaa"',
    "abcabcabca": 'repeats like "abcabcabc"',
    "password12": "very common password",
    "abcdefghij": 'sequences like "abc"',
    "qwertyuiop": "common password",
}


def csrf(page: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)


def client(app, address: str = A):
    c = app.test_client()
    c.environ_base["REMOTE_ADDR"] = address
    return c


def attempt(app, username: str, password: str, address: str = A, headers=None):
    c = client(app, address)
    token = csrf(c.get("/login").get_data(as_text=True))
    resp = c.post("/login", data={"username": username, "password": password,
                                  "csrf_token": token}, headers=headers or {})
    return resp


def codes(app, username: str, passwords, address: str = A, headers=None) -> list[int]:
    return [attempt(app, username, p, address, headers).status_code for p in passwords]


def second_app(web: Web, tiny_models, **config):
    """Another app (its own Vault, engines and pools) over the same databases, as a
    second server process or a restarted one would have."""
    return create_app(WebConfig(settings=web.vault.settings, models_dir=tiny_models,
                                run_jobs=False, secret_key=SECRET, **config))


# -- password policy ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sqlite"])  # the policy reads no database
@pytest.mark.parametrize("weak, why", WEAK.items())
def test_weak_passwords_are_refused_everywhere_saying_why(web, weak, why):
    with web.vault.session() as s, pytest.raises(InvalidInput) as exc:
        accounts.create_user(s, "dora", weak, actor="test")
    assert why in str(exc.value) and "password rejected" in str(exc.value)
    web.user("maria", "smiths", "viewer")
    with web.vault.session() as s, pytest.raises(InvalidInput, match="password rejected"):
        accounts.set_password(s, "maria", weak, actor="test")
    c = web.login("maria")
    resp = c.post("/account", data={"csrf_token": c.csrf, "current": PASSWORD, "new": weak,
                                    "confirm": weak})
    text = resp.get_data(as_text=True)
    assert resp.status_code == 400 and "the new password must be" in text
    assert why in text.replace("&#34;", '"')
    assert attempt(web.app, "maria", PASSWORD, B).status_code == 302  # unchanged


def test_the_cli_refuses_weak_passwords_saying_why(tmp_path, capsys, monkeypatch):
    data = ["--data-dir", str(tmp_path / "vault")]
    assert main(["init", *data]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("a strong enough phrase\n"))
    assert main(["user", "add", "maria", "--password-stdin", *data]) == 0
    capsys.readouterr()
    for weak, why in WEAK.items():
        for command in (["user", "add", "dora"], ["user", "passwd", "maria"]):
            monkeypatch.setattr(sys, "stdin", io.StringIO(weak + "\n"))
            assert main([*command, "--password-stdin", *data]) == 8, (weak, command)
            err = capsys.readouterr().err
            assert "password rejected" in err and why in err, err


@pytest.mark.parametrize("backend", ["sqlite"])  # the policy reads no database
def test_the_username_and_the_product_name_do_not_make_a_password(web):
    for weak in ("dora-the-user1", "Dora-The-User!", "idvault2026", "idvaultidvault"):
        with web.vault.session() as s, pytest.raises(InvalidInput, match="harder to guess"):
            accounts.create_user(s, "dora-the-user", weak, actor="test")


@pytest.mark.parametrize("backend", ["sqlite"])  # the policy reads no database
def test_generated_one_time_passwords_pass_the_policy(web):
    for i in range(40):
        password = accounts.generate_password(f"user{i}")
        assert accounts.password_problems(password, f"user{i}") == []
    with web.vault.session() as s:
        _, generated = accounts.create_user(s, "dora", actor="test")
    assert accounts.password_problems(generated, "dora") == []


# -- the throttle ------------------------------------------------------------------------------
def test_five_failures_from_one_address_lock_only_that_address(web):
    web.user("maria", "smiths", "editor")
    assert codes(web.app, "maria", [f"wrong{i}" for i in range(5)]) == [401] * 5
    locked = attempt(web.app, "maria", PASSWORD)  # even the right password, from A
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) == 300
    assert "this account from your address is locked" in locked.get_data(as_text=True)
    # B is another client: maria still signs in from there.
    assert attempt(web.app, "maria", PASSWORD, B).status_code == 302


def test_success_clears_the_count(web):
    web.user("maria", "smiths", "editor")
    assert codes(web.app, "maria", ["wrong"] * 4 + [PASSWORD] + ["wrong"] * 4) == \
        [401] * 4 + [302] + [401] * 4
    assert attempt(web.app, "maria", PASSWORD).status_code == 302


def test_spraying_accounts_from_one_address_locks_the_address(web, tiny_models):
    app = second_app(web, tiny_models, login_address_attempts=8)
    try:
        web.user("maria", "smiths", "editor")
        names = [f"guess{i}" for i in range(8)]
        assert [attempt(app, n, "password123").status_code for n in names] == [401] * 8
        locked = attempt(app, "maria", PASSWORD)
        assert locked.status_code == 429
        assert "every account from your address" in locked.get_data(as_text=True)
        assert attempt(app, "maria", PASSWORD, B).status_code == 302
    finally:
        app.extensions["idvault"].close()


def test_the_throttle_is_shared_by_two_apps_and_survives_a_restart(web, tiny_models):
    web.user("maria", "smiths", "editor")
    other = second_app(web, tiny_models)
    try:
        assert codes(web.app, "maria", ["wrong"] * 3) == [401] * 3
        assert codes(other, "maria", ["wrong"] * 2) == [401] * 2  # 5 in all
        assert attempt(web.app, "maria", PASSWORD).status_code == 429
        assert attempt(other, "maria", PASSWORD).status_code == 429
    finally:
        other.extensions["idvault"].close()
    restarted = second_app(web, tiny_models)  # a new process: nothing kept in memory
    try:
        assert attempt(restarted, "maria", PASSWORD).status_code == 429
        assert attempt(restarted, "maria", PASSWORD, B).status_code == 302
    finally:
        restarted.extensions["idvault"].close()


def test_forwarded_for_is_ignored_unless_the_proxy_is_trusted(web, tiny_models):
    web.user("maria", "smiths", "editor")
    spoofed = [attempt(web.app, "maria", "wrong", headers={"X-Forwarded-For": f"10.0.0.{i}"})
               .status_code for i in range(6)]
    assert spoofed == [401] * 5 + [429]  # one client (A), whatever it claims
    proxied = second_app(web, tiny_models, trust_proxy=True)
    try:
        # Behind a trusted proxy the client is the proxy's X-Forwarded-For.
        assert attempt(proxied, "maria", PASSWORD, A,
                       {"X-Forwarded-For": "192.0.2.44"}).status_code == 302
        assert attempt(proxied, "maria", PASSWORD, A,
                       {"X-Forwarded-For": A}).status_code == 429
    finally:
        proxied.extensions["idvault"].close()


def test_guessing_the_current_password_on_the_account_page_is_throttled(web):
    web.user("maria", "smiths", "editor")
    c = web.login("maria")
    c.environ_base["REMOTE_ADDR"] = A
    statuses = [c.post("/account", data={"csrf_token": c.csrf, "current": f"guess{i}",
                                         "new": "a brand new phrase", "confirm":
                                         "a brand new phrase"}).status_code for i in range(6)]
    assert statuses == [400] * 5 + [429]
    assert attempt(web.app, "maria", PASSWORD).status_code == 429
    assert attempt(web.app, "maria", PASSWORD, B).status_code == 302


# -- one-time passwords --------------------------------------------------------------------------
def test_a_one_time_password_session_can_only_change_the_password(web):
    with web.vault.session() as s:
        _, generated = accounts.create_user(s, "newbie", actor="test")
        accounts.grant(s, "newbie", "smiths", "admin", actor="test")
    c = client(web.app)
    resp = c.post("/login", data={"username": "newbie", "password": generated,
                                  "csrf_token": csrf(c.get("/login").get_data(as_text=True))})
    assert resp.status_code == 302 and resp.headers["Location"] == "/account"
    page = c.get("/account")
    assert page.status_code == 200
    token = csrf(page.get_data(as_text=True))
    h = {"X-CSRF-Token": token}
    # The JSON API: reads and writes refused with the one error shape, naming the route.
    for method, path, kw in (("get", "/v1/identities", {}), ("get", "/v1/me", {}),
                             ("post", "/v1/identities", {"json": {"name": "ana", "consent": {}}}),
                             ("get", "/v1/no-such-route", {})):
        resp = getattr(c, method)(path, headers=h, **kw)
        body = resp.get_json()
        assert resp.status_code == 403, (path, resp.status_code)
        assert body["error"]["code"] == "forbidden"
        assert body["error"]["details"]["reason"] == "password_change_required"
        assert "change it first at /account" in body["error"]["message"]
    with web.vault.session() as s:
        assert list_identities(s, "smiths") == []
    # Every UI page but the account page sends you there.
    for path in ("/", "/api-keys", "/members", "/reviews", "/enroll", "/jobs"):
        resp = c.get(path)
        assert resp.status_code == 302 and resp.headers["Location"] == "/account", path
    # What anyone may read stays readable.
    assert c.get("/v1/health").status_code == 200
    # Changing it lifts the restriction.
    resp = c.post("/account", data={"csrf_token": token, "current": generated,
                                    "new": "my own long phrase", "confirm": "my own long phrase"})
    assert resp.status_code == 302
    token = csrf(c.get("/account").get_data(as_text=True))
    assert c.get("/v1/identities").status_code == 200
    resp = c.post("/v1/identities", headers={"X-CSRF-Token": token},
                  json={"name": "ana", "consent": consent_doc()})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert c.get("/").status_code == 200


def test_api_keys_are_not_sessions(web):
    with web.vault.session() as s:
        accounts.create_user(s, "newbie", actor="test")  # a one-time password, never changed
        accounts.grant(s, "newbie", "smiths", "admin", actor="test")
    assert web.client.get("/v1/identities", headers=web.headers()).status_code == 200


# -- real server processes -----------------------------------------------------------------------
def _http_attempt(url: str, username: str, password: str, address: str) -> int:
    s = requests.Session()
    s.headers["X-Forwarded-For"] = address  # the servers trust their (loopback) proxy
    token = csrf(s.get(url + "/login", timeout=30).text)
    return s.post(url + "/login", data={"username": username, "password": password,
                                        "csrf_token": token},
                  timeout=30, allow_redirects=False).status_code


@pytest.mark.slow
def test_two_server_processes_share_the_throttle_and_a_restart_keeps_it(family, tmp_path):
    settings = family.settings
    with family.session() as s:
        accounts.create_user(s, "maria", PASSWORD, actor="test")
        accounts.grant(s, "maria", "smiths", "editor", actor="test")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "IDVAULT_DEBUG": "",
           "IDVAULT_DATA_DIR": str(settings.data_dir), "IDVAULT_TRUST_PROXY": "1"}
    env.update({k: v for k, v in (("IDVAULT_DATABASE_URL", settings.database_url),
                                  ("IDVAULT_KEYSTORE_URL", settings.keystore_url)) if v})
    d = Deployment(tmp_path, env)
    try:
        one, two = d.serve("server-1", ml=False), d.serve("server-2", ml=False)
        assert one.popen.pid != two.popen.pid
        # Failures spread over both processes add up: 3 on one, 2 on the other.
        assert [_http_attempt(one.url, "maria", "wrong", A) for _ in range(3)] == [401] * 3
        assert [_http_attempt(two.url, "maria", "wrong", A) for _ in range(2)] == [401] * 2
        assert _http_attempt(one.url, "maria", PASSWORD, A) == 429
        assert _http_attempt(two.url, "maria", PASSWORD, A) == 429
        # Another client address is not locked out.
        assert _http_attempt(two.url, "maria", PASSWORD, B) == 302
        one.stop()
        two.stop()
        three = d.serve("server-3", ml=False)  # after a restart the lock still holds
        assert _http_attempt(three.url, "maria", PASSWORD, A) == 429
        assert _http_attempt(three.url, "maria", PASSWORD, B) == 302
    finally:
        d.stop_all()
