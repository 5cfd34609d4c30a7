"""The authorisation matrix: every API endpoint against each scope, each role, no
credentials, and a second owner's key (whose view of the first owner is a 404 with no
data, the same answer as for something that does not exist)."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from tests.helpers import consent_doc
from tests.web.web_fixtures import TWIN_OF_3, photo_bytes
from vault import accounts, api_keys, codec


@pytest.fixture
def backend() -> str:
    return "sqlite"


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # with {placeholders} filled from the seeded data
    scope: str | None  # None: any authenticated caller
    body: str | None = None  # "json:<name>" or "photos"
    handle_path: bool = False  # names a smiths handle or id: another owner gets 404

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


ENDPOINTS = [
    Endpoint("GET", "/v1/me", None),
    Endpoint("GET", "/v1/owner", "identities:read"),
    Endpoint("GET", "/v1/owner/members", "admin"),
    Endpoint("PUT", "/v1/owner/members/maria", "admin", "json:role"),
    Endpoint("DELETE", "/v1/owner/members/maria", "admin"),
    Endpoint("GET", "/v1/identities", "identities:read"),
    Endpoint("POST", "/v1/identities", "identities:write", "json:identity"),
    Endpoint("GET", "/v1/identities/smiths/ana", "identities:read", handle_path=True),
    Endpoint("DELETE", "/v1/identities/smiths/ben", "identities:write", handle_path=True),
    Endpoint("GET", "/v1/identities/smiths/ana/consent", "identities:read", handle_path=True),
    Endpoint("GET", "/v1/identities/smiths/ana/receipt", "identities:read", handle_path=True),
    Endpoint("POST", "/v1/identities/smiths/cara/consent/withdraw", "identities:write",
             "json:reason", handle_path=True),
    Endpoint("POST", "/v1/identities/smiths/ana/enroll", "identities:write", "photos",
             handle_path=True),
    Endpoint("POST", "/v1/identities/smiths/ana/kinds", "identities:write", "json:kinds",
             handle_path=True),
    Endpoint("POST", "/v1/photos/check", "identities:write", "photos"),
    Endpoint("GET", "/v1/identities/smiths/ana/artifacts", "identities:read", handle_path=True),
    Endpoint("GET", "/v1/identities/smiths/ana/artifacts/{face}", "identities:read",
             handle_path=True),
    Endpoint("GET", "/v1/identities/smiths/ana/artifacts/{face}/payload?purpose=generate",
             "artifacts:read", handle_path=True),
    Endpoint("GET", "/v1/identities/smiths/eve/exports/photomaker", "artifacts:read",
             handle_path=True),
    Endpoint("GET", "/v1/reviews", "identities:read"),
    Endpoint("POST", "/v1/reviews/{review}/accept", "identities:write", handle_path=True),
    Endpoint("POST", "/v1/reviews/{review}/reject", "identities:write", handle_path=True),
    Endpoint("GET", "/v1/not-same", "identities:read"),
    Endpoint("POST", "/v1/not-same", "identities:write", "json:pair"),
    Endpoint("GET", "/v1/job-kinds", "identities:read"),
    Endpoint("GET", "/v1/jobs", "identities:read"),
    Endpoint("POST", "/v1/jobs", "admin", "json:job"),
    Endpoint("GET", "/v1/jobs/{job}", "identities:read", handle_path=True),
    Endpoint("POST", "/v1/jobs/{job}/cancel", "admin", handle_path=True),
    Endpoint("POST", "/v1/generate", "generate", "json:generate"),
    Endpoint("POST", "/v1/identities/smiths/ana/personalize", "generate", "personalize",
             handle_path=True),
    Endpoint("GET", "/v1/jobs/{scene}/image", "identities:read", handle_path=True),
    Endpoint("GET", "/v1/jobs/{scene}/verify", "identities:read", handle_path=True),
    Endpoint("POST", "/v1/verify", "identities:read", "png"),
    Endpoint("GET", "/v1/audit", "identities:read"),
    Endpoint("GET", "/v1/audit/verify", "admin"),
    Endpoint("GET", "/v1/api-keys", "admin"),
    Endpoint("POST", "/v1/api-keys", "admin", "json:key"),
    Endpoint("DELETE", "/v1/api-keys/{key}", "admin", handle_path=True),
]
PUBLIC = ["/v1/health", "/v1/openapi.json"]


def test_the_matrix_covers_every_route(web, seeded):
    adapter = web.app.url_map.bind("localhost")
    routed = {(rule.endpoint, m) for rule in web.app.url_map.iter_rules()
              if rule.rule.startswith("/v1/") and rule.rule not in PUBLIC
              for m in rule.methods - {"HEAD", "OPTIONS"}}
    covered = {(adapter.match(e.path.format(**seeded).split("?")[0], method=e.method)[0],
                e.method) for e in ENDPOINTS}
    assert covered == routed, routed ^ covered


@pytest.fixture
def seeded(web):
    """smiths: ana (enrolled, face), ben, cara, eve (photomaker; consent grants share), a
    pending review (dan held, resembles cleo), a job, a member, keys."""
    h = web.headers()
    assert web.enroll("smiths/ana", 1, (0, 1)).status_code == 201
    for name in ("ben", "cara"):
        assert web.client.post("/v1/identities", headers=h, json={
            "name": name, "consent": consent_doc()}).status_code == 201
    web.client.post("/v1/identities", headers=h, json={"name": "eve", "consent": consent_doc(
        purposes=["enroll", "generate", "share"])})
    pm = codec.encode("photomaker", {"id_embeds": np.ones((1, 1, 2048), np.float16)},
                      {"model_id": "pm", "version": "v1"})
    web.vault.put_artifact("smiths/eve", "photomaker", pm, actor="test")
    assert web.enroll("smiths/cleo", 3, (0, 1)).status_code == 201
    held = web.enroll("smiths/dan", 4, (0, 1), kin=TWIN_OF_3).get_json()
    assert held["status"] == "held"
    job = web.client.post("/v1/jobs", headers=h, json={"kind": "rebuild_index"}).get_json()
    scene = finished_scene(web, h)
    web.user("maria", "smiths", "viewer")
    with web.vault.session() as s:
        key, _ = api_keys.create_key(s, "smiths", "victim", ["identities:read"], actor="t")
        key_id = key.id
    face = web.client.get("/v1/identities/smiths/ana", headers=h).get_json()["artifacts"][0]
    return {"face": face["id"], "review": held["review_id"], "job": job["id"], "key": key_id,
            "scene": scene}


def finished_scene(web, h) -> str:
    """A generate job of smiths, finished with a stored PNG (as the worker leaves it; the
    generation itself is tested in test_generation.py with the tiny SDXL models)."""
    from vault import generated_images
    from vault.identities import get_owner
    from vault.models import Job

    # Written as the worker leaves it: the API refuses to queue a generation on a server
    # with no SDXL base model (its pre-check), and this matrix needs no model.
    with web.vault.session() as s:
        row = Job(owner_id=get_owner(s, "smiths").id, kind="generate", status="done",
                  progress=1.0, params={"prompt": "@smiths/ana"})
        s.add(row)
        s.flush()
        scene = row.id
        row.result = {"image": f"outputs/{scene}.png", "width": 8, "height": 8}
    path = generated_images.image_path(web.vault.settings.data_dir, scene)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "gray").save(path)
    return scene


def call(web, client, e: Endpoint, ids: dict, headers: dict | None = None):
    path = e.path.format(**ids)
    kwargs: dict = {"headers": headers or {}}
    if e.body == "json:role":
        kwargs["json"] = {"role": "viewer"}
    elif e.body == "json:identity":
        kwargs["json"] = {"name": "zed", "consent": consent_doc()}
    elif e.body == "json:reason":
        kwargs["json"] = {"reason": "test"}
    elif e.body == "json:pair":
        kwargs["json"] = {"a": "smiths/ana", "b": "smiths/ben"}
    elif e.body == "json:kinds":
        kwargs["json"] = {"kinds": "faceid"}  # no photos: refused as 400 when allowed
    elif e.body == "json:job":
        kwargs["json"] = {"kind": "rebuild_index"}
    elif e.body == "json:generate":
        kwargs["json"] = {"prompt": "@smiths/ana by a lake", "steps": 1}
    elif e.body == "png":
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "PNG")
        kwargs["data"] = {"image": (io.BytesIO(buf.getvalue()), "x.png")}
        kwargs["content_type"] = "multipart/form-data"
    elif e.body == "json:key":
        kwargs["json"] = {"name": "k", "scopes": ["admin"]}  # no key grants more than it holds
    elif e.body in ("photos", "personalize"):
        kwargs["data"] = {"photos": [(io.BytesIO(photo_bytes(1, 7)), "a.jpg")]}
        if e.body == "personalize":
            kwargs["data"]["kind"] = "lidb"
        kwargs["content_type"] = "multipart/form-data"
    return client.open(path, method=e.method, **kwargs)


def refused(resp) -> bool:
    body = resp.get_json(silent=True) or {}
    return resp.status_code in (401, 403) and body.get("error", {}).get("code") in (
        "unauthorized", "forbidden")


def snapshot(web) -> str:
    """Everything the endpoints could change, to show a refusal changed nothing."""
    h = web.headers()
    parts = [web.client.get(p, headers=h).get_data(as_text=True) for p in (
        "/v1/identities?limit=500", "/v1/reviews", "/v1/not-same", "/v1/jobs",
        "/v1/owner/members", "/v1/api-keys")]
    # Key use times move with every call; compare keys without them.
    parts[-1] = json.dumps([{k: v for k, v in key.items() if k != "last_used_at"}
                            for key in json.loads(parts[-1])["items"]])
    return "\n".join(parts)


def test_each_scope_against_each_endpoint(web, seeded):
    for scope in api_keys.SCOPES:
        web.headers("smiths", scope)
    before = snapshot(web)
    allowed: list[tuple[str, Endpoint]] = []
    for scope in api_keys.SCOPES:
        headers = web.headers("smiths", scope)
        for e in ENDPOINTS:
            if e.scope is None or e.scope == scope:
                allowed.append((scope, e))
                continue
            resp = call(web, web.client, e, seeded, headers)
            assert refused(resp) and resp.status_code == 403, (scope, str(e), resp.status_code,
                                                                resp.get_data(as_text=True))
            assert set(resp.get_json()) == {"error"}
            assert repr(e.scope) in resp.get_json()["error"]["message"]
    assert snapshot(web) == before, "a refused request changed something"
    for scope, e in allowed:
        resp = call(web, web.client, e, seeded, web.headers("smiths", scope))
        assert not refused(resp), (scope, str(e), resp.get_data(as_text=True))
        assert resp.status_code < 500


def test_each_role_against_each_endpoint(web, seeded):
    sessions = {}
    for role in accounts.ROLES:
        web.user(f"{role}-user", "smiths", role)
        sessions[role] = web.login(f"{role}-user")
    before = snapshot(web)
    for role, client in sessions.items():
        scopes = accounts.ROLE_SCOPES[role]
        for e in ENDPOINTS:
            if e.scope is None or e.scope in scopes:
                continue
            resp = call(web, client, e, seeded, {"X-CSRF-Token": client.csrf})
            assert refused(resp) and resp.status_code == 403, (role, str(e), resp.status_code)
            assert f"({role})" in resp.get_json()["error"]["message"]
    assert snapshot(web) == before
    for role, client in sessions.items():
        scopes = accounts.ROLE_SCOPES[role]
        for e in ENDPOINTS:
            if e.scope is None or e.scope in scopes:
                resp = call(web, client, e, seeded, {"X-CSRF-Token": client.csrf})
                assert not refused(resp), (role, str(e), resp.get_data(as_text=True))


def test_sessions_need_the_csrf_token_for_unsafe_calls(web, seeded):
    web.user("eddie", "smiths", "editor")
    client = web.login("eddie")
    assert client.get("/v1/identities").status_code == 200  # safe: no token needed
    for e in ENDPOINTS:
        if e.method == "GET":
            continue
        resp = call(web, client, e, seeded, {})
        assert resp.status_code == 403 and resp.get_json()["error"]["details"].get(
            "reason") == "csrf", str(e)
        resp = call(web, client, e, seeded, {"X-CSRF-Token": "forged"})
        assert resp.status_code == 403, str(e)


def test_no_credentials_and_bad_credentials(web, seeded):
    for e in ENDPOINTS:
        for headers in ({}, {"Authorization": "Bearer idv_000000000000_" + "A" * 43},
                        {"Authorization": "Basic dXNlcjpwYXNz"},
                        {"Authorization": "Bearer"}, {"Authorization": "Bearer ' OR 1=1 --"}):
            resp = call(web, web.client, e, seeded, headers)
            assert resp.status_code == 401, (str(e), headers, resp.status_code)
            assert resp.get_json()["error"]["code"] == "unauthorized"
    for path in PUBLIC:
        assert web.client.get(path).status_code == 200


def test_a_well_formed_key_nobody_issued_is_unknown_not_malformed(web):
    for token, why in (("idv_000000000000_nope", "unknown API key"),
                       ("idv_000000000000_" + "A" * 43, "unknown API key"),
                       (web.key()[:-1], "unknown API key"),  # a real key, cut short
                       ("idv_nope", "malformed API key"), ("' OR 1=1 --", "malformed API key")):
        resp = web.client.get("/v1/identities", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 401, token
        error = resp.get_json()["error"]
        assert error["code"] == "unauthorized" and error["message"].startswith(why), error


def test_another_owners_key_sees_nothing(web, seeded):
    """northlight's key, with every scope, against smiths' handles and ids: 404, exactly
    the answer for a handle or id that does not exist; its lists hold nothing of smiths."""
    before = snapshot(web)
    theirs = web.headers("northlight")
    missing = {"face": "00000000-0000-0000-0000-000000000000", "review": 99999,
               "job": "00000000-0000-0000-0000-000000000000", "key": 99999,
               "scene": "00000000-0000-0000-0000-000000000000"}
    for e in ENDPOINTS:
        resp = call(web, web.client, e, seeded, theirs)
        text = resp.get_data(as_text=True)
        if e.handle_path:
            assert resp.status_code == 404, (str(e), text)
            assert resp.get_json()["error"]["code"] in ("not_found",), (str(e), text)
            # The same answer as for something that does not exist.
            ghost = call(web, web.client, Endpoint(
                e.method, e.path.replace("/ana", "/zzz").replace("/ben", "/zzz")
                .replace("/cara", "/zzz").replace("/eve", "/zzz"), e.scope, e.body),
                missing, theirs)
            expected = ghost.get_data(as_text=True).replace("zzz", "NAME")
            for real, fake in ((seeded["job"], missing["job"]), (seeded["face"], missing["face"]),
                               (seeded["scene"], missing["scene"]),
                               ("ana", "NAME"), ("ben", "NAME"), ("cara", "NAME"),
                               ("eve", "NAME"), (str(seeded["review"]), "99999"),
                               (str(seeded["key"]), "99999")):
                text = re.sub(rf"(?<![\w-]){re.escape(real)}(?![\w-])", fake, text)
            assert ghost.status_code == 404 and text.replace("zzz", "NAME") == expected, str(e)
        else:
            assert resp.status_code < 500, (str(e), text)
            for secret in ("smiths/", "ana", "cleo", "maria", "victim", seeded["face"],
                           seeded["job"], seeded["scene"]):
                if secret in e.path or (e.body == "json:pair" and secret in "smiths/ana") or (
                        e.body == "json:generate" and secret in "@smiths/ana by a lake") or (
                        secret == "maria" and e.path == "/v1/audit"):
                    # The caller's own words echoed back, or its own act: the PUT above
                    # made maria a member of northlight, which its audit log records.
                    continue
                assert secret not in text, (str(e), secret, text[:500])
    assert snapshot(web) == before, "another owner's key changed something of smiths"
    # Not-same pairs name handles in the body: the same answer as for missing ones.
    real = web.client.post("/v1/not-same", headers=theirs, json={"a": "smiths/ana",
                                                                 "b": "smiths/ben"})
    ghost = web.client.post("/v1/not-same", headers=theirs, json={"a": "smiths/zzz",
                                                                  "b": "smiths/yyy"})
    assert real.status_code == ghost.status_code == 404
    assert real.get_data(as_text=True).replace("ana", "zzz") == ghost.get_data(as_text=True)
    # A second owner's session sees no more than its key.
    web.user("nora", "northlight", "admin")
    nora = web.login("nora")
    assert nora.get("/v1/identities/smiths/ana").status_code == 404
    assert "smiths" not in nora.get("/v1/identities").get_data(as_text=True)
