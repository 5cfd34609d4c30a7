"""The app itself: one error shape, security headers, limits, cookies, CSRF, config."""

from __future__ import annotations

import re

import pytest

from tests.web.web_fixtures import PASSWORD, SECRET
from vault.errors import IntegrityError, InvalidInput, KeyUnavailable, ModelUnavailable
from web.app import CSP, SECRET_FILE, WebConfig, create_app
from web.errors import STATUS, status_for


@pytest.fixture
def backend() -> str:
    return "sqlite"


def shape(resp, status: int, code: str) -> dict:
    assert resp.status_code == status
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    return body["error"]


def test_one_error_shape_for_http_errors(web):
    shape(web.client.get("/v1/nope"), 404, "not_found")
    shape(web.client.get("/nope", headers={"Accept": "application/json"}), 404, "not_found")
    e = shape(web.client.delete("/v1/health"), 405, "method_not_allowed")
    assert e["details"]["allowed"] == ["GET", "HEAD", "OPTIONS"]
    shape(web.client.get("/v1/identities"), 401, "unauthorized")


def test_server_errors_hide_everything(family, tiny_models, caplog):
    app = create_app(WebConfig(vault=family, run_jobs=False, secret_key=SECRET))

    def boom():
        raise RuntimeError("secret detail /srv/idvault/master.key")

    def integrity():
        raise IntegrityError("artifact 42 of smiths/ana: tampered at /srv/x")

    def no_key():
        raise KeyUnavailable("key file /srv/idvault/master.key is unreadable")

    def no_model():
        raise ModelUnavailable("w600k_r50.onnx missing in /home/op/.insightface")

    for rule, fn in (("/v1/boom", boom), ("/v1/integrity", integrity), ("/v1/nokey", no_key),
                     ("/v1/nomodel", no_model)):
        app.add_url_rule(rule, fn.__name__, fn)
    client = app.test_client()
    for path, status, code in (("/v1/boom", 500, "internal_error"),
                               ("/v1/integrity", 500, "integrity_error"),
                               ("/v1/nokey", 503, "key_unavailable"),
                               ("/v1/nomodel", 503, "model_unavailable")):
        resp = client.get(path)
        e = shape(resp, status, code)
        text = resp.get_data(as_text=True)
        assert "/srv" not in text and "/home" not in text and "Traceback" not in text
        assert "secret" not in text and re.fullmatch(r"[0-9a-f]{12}", e["details"]["reference"])
        assert e["details"]["reference"] in caplog.text  # the operator can find it
    assert "secret detail" in caplog.text
    # A browser gets a page, with no details either.
    resp = client.get("/boom-page-does-not-exist", headers={"Accept": "text/html"})
    assert resp.status_code == 404 and resp.mimetype == "text/html"
    assert "Not found" in resp.get_data(as_text=True)
    app.extensions["idvault"].close()


def test_the_error_map_is_complete():
    from vault import errors

    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.VaultError)]
    for cls in classes:
        status = status_for(cls.__new__(cls))
        assert 400 <= status < 600, cls
    assert status_for(errors.DuplicateIdentity("x", handle="a/b", score=1, decision="block")) \
        == 409
    assert status_for(errors.ConsentWithdrawn("x")) == 403
    assert STATUS[-1][0] is errors.VaultError


def test_security_headers_everywhere(web):
    for path, headers in (("/v1/health", {}), ("/login", {}), ("/retention-policy", {}),
                          ("/static/app.css", {}), ("/v1/nope", {}),
                          ("/nope", {"Accept": "text/html"})):
        resp = web.client.get(path, headers=headers)
        h = resp.headers
        assert h["Content-Security-Policy"] == CSP, path
        assert "frame-ancestors 'none'" in CSP and "http" not in CSP
        assert h["X-Content-Type-Options"] == "nosniff"
        assert h["X-Frame-Options"] == "DENY"
        assert h["Referrer-Policy"] == "no-referrer"
        if not path.startswith("/static"):
            assert h["Cache-Control"] == "no-store"
    assert "Strict-Transport-Security" not in web.client.get("/v1/health").headers
    https = web.client.get("/v1/health", base_url="https://vault.example")
    assert https.headers["Strict-Transport-Security"].startswith("max-age=")


def test_no_external_resources_in_pages(web):
    web.user("maria", "smiths", "admin")
    client = web.login("maria")
    for path in ("/", "/enroll", "/reviews", "/api-keys", "/members", "/generate", "/jobs",
                 "/account", "/retention-policy"):
        html = client.get(path).get_data(as_text=True)
        assert client.get(path).status_code == 200, path
        for url in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert url.startswith(("/", "#")), (path, url)
        assert "<script>" not in html and "style=" not in html, path  # CSP-clean


def test_request_size_limit(family, tiny_models):
    app = create_app(WebConfig(vault=family, run_jobs=False, secret_key=SECRET,
                               max_request_bytes=1000))
    assert app.config["MAX_CONTENT_LENGTH"] == 1000
    resp = app.test_client().post("/v1/identities", data=b"x" * 5000,
                                  headers={"Content-Type": "application/json",
                                           "Authorization": "Bearer x"})
    assert resp.status_code in (401, 413)
    resp = app.test_client().post("/login", data={"username": "x" * 5000})
    shape(resp, 413, "payload_too_large")
    app.extensions["idvault"].close()


def test_session_cookie_flags_and_secret_file(web, family):
    web.user("maria", "smiths", "admin")
    client = web.app.test_client()
    page = client.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    resp = client.post("/login", data={"username": "maria", "password": PASSWORD,
                                       "csrf_token": token})
    cookie = resp.headers["Set-Cookie"]
    assert "idvault_session=" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert "Secure" not in cookie
    secure = web.app.test_client()
    page = secure.get("/login", base_url="https://vault.example").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    resp = secure.post("/login", base_url="https://vault.example",
                       data={"username": "maria", "password": PASSWORD,
                             "csrf_token": token})
    assert "Secure" in resp.headers["Set-Cookie"]
    # Without a configured secret, one is made once, 0600, in the data folder.
    app = create_app(WebConfig(vault=family, run_jobs=False))
    path = family.settings.data_dir / SECRET_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert app.config["SECRET_KEY"] == create_app(
        WebConfig(vault=family, run_jobs=False)).config["SECRET_KEY"]


def test_servers_starting_together_share_one_complete_secret(family):
    """Two servers started at once used to race: the loser read the winner's file before
    it was written and signed cookies with an empty key (HTTP 500 on every page)."""
    import threading

    from web.app import _secret_key

    path = family.settings.data_dir / SECRET_FILE
    config = WebConfig(vault=family, run_jobs=False)
    for _ in range(20):
        path.unlink(missing_ok=True)
        barrier, keys = threading.Barrier(8), []

        def start():
            barrier.wait()
            keys.append(_secret_key(config, family.settings))

        threads = [threading.Thread(target=start) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(keys)) == 1 and len(keys[0]) >= 32
        assert path.read_text().strip() == keys[0]
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(f".{SECRET_FILE}")] == []
    # A file left empty (by an older version's crash) is named, not used as a key.
    path.write_text("")
    with pytest.raises(InvalidInput, match="secret key file .* empty or truncated"):
        create_app(config)


def test_forms_need_the_csrf_token(web):
    web.user("maria", "smiths", "admin")
    resp = web.client.post("/login", data={"username": "maria", "password": PASSWORD})
    shape(resp, 403, "forbidden")
    client = web.login("maria")
    for path in ("/logout", "/api-keys", "/enroll", "/members", "/owner/switch"):
        resp = client.post(path, data={"name": "x"}, headers={"Accept": "application/json"})
        assert resp.status_code == 403, path
        assert resp.get_json()["error"]["details"]["reason"] == "csrf"


def test_config_from_environment(tmp_path):
    env = {"IDVAULT_SECRET_KEY": "k" * 40, "IDVAULT_MAX_REQUEST_BYTES": "12345",
           "IDVAULT_TRUST_PROXY": "1", "IDVAULT_MODELS": str(tmp_path)}
    c = WebConfig.from_env(env)
    assert (c.secret_key, c.max_request_bytes, c.trust_proxy, c.models_dir) == (
        "k" * 40, 12345, True, tmp_path)
    from vault.errors import InvalidInput

    with pytest.raises(InvalidInput, match="IDVAULT_MAX_REQUEST_BYTES"):
        WebConfig.from_env({"IDVAULT_MAX_REQUEST_BYTES": "lots"})
    with pytest.raises(InvalidInput):
        WebConfig(max_request_bytes=0)
    assert WebConfig.from_env({"IDVAULT_JOB_MODULES": "a.b, c"}).job_modules == ("a.b", "c")


def test_job_modules_register_their_kinds(family, tmp_path, monkeypatch):
    from vault.errors import InvalidInput
    from vault.jobs import REGISTRY, unregister_kind

    (tmp_path / "my_jobs.py").write_text(
        "from vault.jobs import JobKind, register_kind\n"
        "register_kind(JobKind('my_kind', lambda ctx: {'ok': True}))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        app = create_app(WebConfig(vault=family, run_jobs=False, secret_key=SECRET,
                                   job_modules=("my_jobs",)))
        assert "my_kind" in REGISTRY
        app.extensions["idvault"].close()
    finally:
        unregister_kind("my_kind")
    with pytest.raises(InvalidInput, match="no_such_module"):
        create_app(WebConfig(vault=family, run_jobs=False, secret_key=SECRET,
                             job_modules=("no_such_module",)))


def test_trusted_proxy_marks_https(family):
    app = create_app(WebConfig(vault=family, run_jobs=False, secret_key=SECRET,
                               trust_proxy=True))
    resp = app.test_client().get("/v1/health", headers={"X-Forwarded-Proto": "https"})
    assert "Strict-Transport-Security" in resp.headers
    plain = create_app(WebConfig(vault=family, run_jobs=False, secret_key=SECRET))
    resp = plain.test_client().get("/v1/health", headers={"X-Forwarded-Proto": "https"})
    assert "Strict-Transport-Security" not in resp.headers
