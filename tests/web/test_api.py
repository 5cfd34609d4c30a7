"""The JSON API, endpoint by endpoint (tiny face models; SQLite, and PostgreSQL for the
main flows)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load

from tests.helpers import consent_doc
from tests.web.web_fixtures import TWIN_OF_3, photo_bytes
from vault import codec

BOTH = pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres",
                                                                  marks=pytest.mark.postgres)])


@pytest.fixture
def backend() -> str:
    return "sqlite"


def ok(resp, status=200):
    assert resp.status_code == status, resp.get_data(as_text=True)[:1000]
    return resp.get_json()


def err(resp, status, code=None):
    assert resp.status_code == status, resp.get_data(as_text=True)[:1000]
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


# -- meta --------------------------------------------------------------------------------------
def test_health_me_and_owner(web):
    assert ok(web.client.get("/v1/health")) == {"status": "ok"}
    me = ok(web.client.get("/v1/me", headers=web.headers("smiths", "identities:read")))
    assert me["via"] == "api_key" and me["owner"] == {"name": "smiths", "kind": "family"}
    assert me["scopes"] == ["identities:read"] and me["key"]["prefix"]
    owner = ok(web.client.get("/v1/owner", headers=web.headers()))
    assert owner["name"] == "smiths" and owner["identities"] == 0
    assert owner["erase_policy"] == "immediate"


# -- identities ---------------------------------------------------------------------------------
@BOTH
def test_identity_lifecycle(web):
    h = web.headers()
    for name in ("cleo", "ana", "ben"):
        created = ok(web.client.post("/v1/identities", headers=h,
                                     json={"name": name, "consent": consent_doc()}), 201)
        assert created["handle"] == f"smiths/{name}" and created["consent"]["status"] == "active"
    err(web.client.post("/v1/identities", headers=h,
                        json={"name": "ana", "consent": consent_doc()}), 409, "already_exists")
    page1 = ok(web.client.get("/v1/identities?limit=2", headers=h))
    assert [i["handle"] for i in page1["items"]] == ["smiths/ana", "smiths/ben"]
    page2 = ok(web.client.get(f"/v1/identities?limit=2&cursor={page1['next_cursor']}",
                              headers=h))
    assert [i["handle"] for i in page2["items"]] == ["smiths/cleo"]
    assert page2["next_cursor"] is None
    assert ok(web.client.get("/v1/identities?status=held", headers=h))["items"] == []
    got = ok(web.client.get("/v1/identities/smiths/ana", headers=h))
    assert got["consent"]["subject"] == "Ana Smith" and got["artifacts"] == []
    consent = ok(web.client.get("/v1/identities/smiths/ana/consent", headers=h))
    assert consent == got["consent"]
    receipt = ok(web.client.delete("/v1/identities/smiths/ana", headers=h))
    assert receipt["receipt"]["handle"] == "smiths/ana"
    assert web.vault.verify_receipt(receipt)["handle"] == "smiths/ana"
    err(web.client.get("/v1/identities/smiths/ana", headers=h), 404, "not_found")
    err(web.client.delete("/v1/identities/smiths/ana", headers=h), 404, "not_found")


def test_erasure_receipt_is_issued_again_and_an_unfinished_erasure_is_listed(web):
    from vault.handles import Handle

    h, read = web.headers(), web.headers("smiths", "identities:read")
    for name in ("ana", "ben"):
        ok(web.client.post("/v1/identities", headers=h,
                           json={"name": name, "consent": consent_doc()}), 201)
    err(web.client.get("/v1/identities/smiths/ana/receipt", headers=read), 404, "not_found")
    receipt = ok(web.client.delete("/v1/identities/smiths/ana", headers=h))
    assert ok(web.client.get("/v1/identities/smiths/ana/receipt", headers=read)) == receipt
    err(web.client.get("/v1/identities/smiths/ana/receipt", headers=web.headers("northlight")),
        404, "not_found")
    # ben's erasure was cut short after its first step: listed as erasing, no receipt yet
    web.vault._begin_erasure(Handle.parse("smiths/ben"), actor="test", reason="requested")
    listed = ok(web.client.get("/v1/identities?status=erasing", headers=read))["items"]
    assert [(i["handle"], i["status"]) for i in listed] == [("smiths/ben", "erasing")]
    err(web.client.get("/v1/identities/smiths/ben/receipt", headers=read), 409, "conflict")
    finished = ok(web.client.delete("/v1/identities/smiths/ben", headers=h))
    assert ok(web.client.get("/v1/identities/smiths/ben/receipt", headers=read)) == finished


def test_consent_withdraw_per_policy(web):
    h = web.headers()
    ok(web.client.post("/v1/identities", headers=h,
                       json={"name": "ana", "consent": consent_doc()}), 201)
    out = ok(web.client.post("/v1/identities/smiths/ana/consent/withdraw", headers=h,
                             json={"reason": "changed her mind"}))
    assert out["withdrawn"] and out["erase_policy"] == "immediate"
    assert web.vault.verify_receipt(out["receipt"])["reason"] == "consent withdrawn"
    # A studio that retains: blocked, kept.
    hs = web.headers("northlight")
    ok(web.client.post("/v1/identities", headers=hs,
                       json={"name": "lee", "consent": consent_doc(subject="Lee Park")}), 201)
    out = ok(web.client.post("/v1/identities/northlight/lee/consent/withdraw", headers=hs))
    assert "receipt" not in out and out["erase_policy"] == "retain"
    c = ok(web.client.get("/v1/identities/northlight/lee/consent", headers=hs))
    assert c["status"] == "withdrawn"
    err(web.client.post("/v1/identities/northlight/lee/consent/withdraw", headers=hs), 409,
        "already_exists")


# -- enrollment --------------------------------------------------------------------------------
@BOTH
def test_enroll_duplicate_add_photos(web):
    report = ok(web.enroll("smiths/ana", 1, (0, 1, 2)), 201)
    assert report["status"] == "active" and len(report["photos"]) == 3
    assert report["photos"][0]["photo"] == "ana-0.jpg" and report["photos"][0]["faces_found"] == 1
    assert report["artifacts"][0]["kind"] == "face"
    # The same face under another name: refused with the match, nothing stored.
    dup = err(web.enroll("smiths/anna", 1, (3,)), 409, "duplicate_identity")
    assert dup["details"]["handle"] == "smiths/ana" and dup["details"]["decision"] == "block"
    assert dup["details"]["score"] >= 0.7
    err(web.client.get("/v1/identities/smiths/anna", headers=web.headers()), 404)
    # Another owner's roster is never compared.
    ok(web.enroll("northlight/ana", 1, (0,)), 201)
    # More photos of ana: 200 updated; no consent this time.
    more = ok(web.enroll("smiths/ana", 1, (4,), consent=False), 200)
    assert more["status"] == "updated"
    shapes = ok(web.client.get("/v1/identities/smiths/ana", headers=web.headers()))
    assert shapes["artifacts"][0]["shapes"]["normed"] == [4, 512]
    err(web.enroll("smiths/ana", 1, (5,)), 409)  # consent for an existing identity
    err(web.enroll("smiths/ben", 2, (0,), consent=False), 422)  # new, no consent


def test_enroll_rejects_every_bad_photo_at_once(web):
    data = {"photos": [(io.BytesIO(photo_bytes(2, 0)), "ben.jpg"),
                       (io.BytesIO(b"GIF89a not really"), "ben.gif"),
                       (io.BytesIO(b"\xff\xd8\xff broken"), "../../etc/passwd")],
            "consent": __import__("json").dumps(consent_doc())}
    e = err(web.client.post("/v1/identities/smiths/ben/enroll", data=data,
                            headers=web.headers(), content_type="multipart/form-data"),
            422, "photo_rejected")
    results = {p["photo"]: p for p in e["details"]["photos"]}
    assert results["ben.jpg"]["ok"] and results["ben.jpg"]["reason"] is None
    assert not results["ben.gif"]["ok"] and "GIF is not supported" in results["ben.gif"]["reason"]
    assert not results["passwd"]["ok"]  # base name only, never a path
    assert "2 of 3 photos rejected" in e["message"]
    err(web.client.get("/v1/identities/smiths/ben", headers=web.headers()), 404)



@pytest.mark.parametrize("scale_out", [False, True], ids=["in-process", "scale-out"])
def test_enroll_is_refused_before_any_photo_is_analysed_or_a_job_queued(web, scale_out,
                                                                         monkeypatch):
    """`idvault enroll`'s model-free checks run first: more photos for an identity held
    for review (409) or whose consent was withdrawn (403) are refused at once, with the
    one error shape; no face model runs, nothing is staged and no job is created."""
    ok(web.enroll("smiths/cleo", 3, (0, 1, 2)), 201)
    held = ok(web.enroll("smiths/dan", 4, (0, 1, 2), kin=TWIN_OF_3), 201)
    assert held["status"] == "held"
    ok(web.enroll("northlight/lee", 5, (0, 1)), 201)
    ok(web.client.post("/v1/identities/northlight/lee/consent/withdraw",
                       headers=web.headers("northlight")))  # retain policy: kept, blocked
    jobs = web.state.jobs
    sent: list[tuple] = []
    if scale_out:
        monkeypatch.setattr(jobs, "dispatch", lambda *job: sent.append(job))

    def no_models():
        raise AssertionError("a face model was asked for before the checks")

    monkeypatch.setattr(web.state, "enroller", no_models)
    before = {o: ok(web.client.get("/v1/jobs", headers=web.headers(o)))["items"]
              for o in ("smiths", "northlight")}
    for handle, status, code, needle in (
            ("smiths/dan", 409, "conflict", "held for review"),
            ("northlight/lee", 403, "consent_withdrawn", "withdrawn")):
        e = err(web.enroll(handle, 4, (3,), consent=False), status, code)
        assert needle in e["message"] and handle in e["message"], e
    assert sent == []
    for o, items in before.items():
        assert ok(web.client.get("/v1/jobs", headers=web.headers(o)))["items"] == items
    staged = Path(web.vault.settings.data_dir) / "staged"
    assert not staged.exists() or not any(staged.rglob("*.sealed"))

def test_photo_check(web):
    data = {"photos": [(io.BytesIO(photo_bytes(1, 0)), "a.jpg"),
                       (io.BytesIO(b"hello"), "notes.txt")]}
    out = ok(web.client.post("/v1/photos/check", data=data, headers=web.headers(),
                             content_type="multipart/form-data"))
    a, b = out["photos"]
    assert a["ok"] and a["faces_found"] == 1 and a["reason"] is None
    assert not b["ok"] and b["photo"] == "notes.txt" and b["reason"]
    assert ok(web.client.get("/v1/identities", headers=web.headers()))["items"] == []


def test_review_queue_and_not_same(web):
    h = web.headers()
    ok(web.enroll("smiths/cleo", 3, (0, 1, 2)), 201)
    held = ok(web.enroll("smiths/dan", 4, (0, 1, 2), kin=TWIN_OF_3), 201)
    assert held["status"] == "held" and held["top_match"]["handle"] == "smiths/cleo"
    reviews = ok(web.client.get("/v1/reviews", headers=h))["items"]
    assert [r["handle"] for r in reviews] == ["smiths/dan"]
    rid = reviews[0]["id"]
    decided = ok(web.client.post(f"/v1/reviews/{rid}/accept", headers=h))
    assert decided["status"] == "accepted"
    err(web.client.post(f"/v1/reviews/{rid}/accept", headers=h), 409, "conflict")
    pairs = ok(web.client.get("/v1/not-same", headers=h))["items"]
    assert [(p["a"], p["b"]) for p in pairs] == [("smiths/cleo", "smiths/dan")]
    assert ok(web.client.get("/v1/reviews?status=accepted", headers=h))["items"][0]["id"] == rid
    # A second held twin, rejected: erased with a receipt.
    ok(web.enroll("smiths/eli", 5, (0, 1)), 201)
    held = ok(web.enroll("smiths/fay", 6, (0, 1), kin=(5, 0.3)), 201)
    assert held["status"] == "held"
    rejected = ok(web.client.post(f"/v1/reviews/{held['review_id']}/reject", headers=h))
    assert rejected["status"] == "rejected"
    assert web.vault.verify_receipt(rejected["receipt"])["handle"] == "smiths/fay"
    err(web.client.get("/v1/identities/smiths/fay", headers=h), 404)
    err(web.client.post("/v1/reviews/999/reject", headers=h), 404)
    # Not-same pairs by hand.
    ok(web.client.post("/v1/identities", headers=h,
                       json={"name": "gus", "consent": consent_doc()}), 201)
    pair = ok(web.client.post("/v1/not-same", headers=h,
                              json={"a": "@smiths/gus", "b": "smiths/cleo"}), 201)
    assert pair["a"] == "smiths/gus" and pair["b"] == "smiths/cleo"
    err(web.client.post("/v1/not-same", headers=h, json={"a": "smiths/gus", "b": "smiths/gus"}),
        400)


# -- artifacts -----------------------------------------------------------------------------------
def _photomaker(photos: int = 2) -> bytes:
    rng = np.random.default_rng(0)
    return codec.encode("photomaker", {"id_embeds": rng.normal(size=(photos, 1, 2048))
                                       .astype(np.float16)},
                        {"model_id": "photomaker-v1", "version": "v1"})


def test_artifacts_download_and_exports(web):
    ok(web.enroll("smiths/ana", 1, (0, 1)), 201)
    web.vault.put_artifact("smiths/ana", "photomaker", _photomaker(), actor="test")
    h = web.headers("smiths", "identities:read")
    arts = ok(web.client.get("/v1/identities/smiths/ana/artifacts", headers=h))["items"]
    assert sorted(a["kind"] for a in arts) == ["face", "photomaker"]
    face = next(a for a in arts if a["kind"] == "face")
    assert ok(web.client.get(f"/v1/identities/smiths/ana/artifacts/{face['id']}",
                             headers=h)) == face
    err(web.client.get("/v1/identities/smiths/ana/artifacts/nope", headers=h), 404)
    # Decrypted download: artifacts:read, and consent must grant the purpose.
    err(web.client.get(f"/v1/identities/smiths/ana/artifacts/{face['id']}/payload",
                       headers=h), 403, "forbidden")
    hr = web.headers("smiths", "artifacts:read")
    err(web.client.get(f"/v1/identities/smiths/ana/artifacts/{face['id']}/payload",
                       headers=hr), 403, "purpose_not_granted")  # consent lacks 'share'
    resp = web.client.get(f"/v1/identities/smiths/ana/artifacts/{face['id']}/payload"
                          "?purpose=generate", headers=hr)
    assert resp.status_code == 200 and resp.mimetype == "application/octet-stream"
    assert load(resp.data)["normed"].shape == (2, 512)
    assert resp.headers["X-Content-SHA256"] == face["sha256"]
    reads = [e for e in ok(web.client.get("/v1/audit?subject=smiths/ana", headers=h))["items"]
             if e["action"] == "artifact.read"]
    assert reads and reads[0]["details"]["purpose"] == "generate"
    assert reads[0]["actor"].startswith("api:")
    # Exports (consent must grant 'share').
    err(web.client.get("/v1/identities/smiths/ana/exports/photomaker", headers=hr), 403)
    ok(web.client.post("/v1/identities", headers=web.headers(),
                       json={"name": "bo", "consent": consent_doc(
                           purposes=["enroll", "generate", "share"])}), 201)
    web.vault.put_artifact("smiths/bo", "photomaker", _photomaker(3), actor="test")
    resp = web.client.get("/v1/identities/smiths/bo/exports/photomaker", headers=hr)
    assert resp.status_code == 200
    assert load(resp.data)["id_embeds"].shape == (3, 1, 2048)
    e = err(web.client.get("/v1/identities/smiths/bo/exports/textual_inversion", headers=hr),
            404)
    assert "has no celeb_basis artifact" in e["message"]
    e = err(web.client.get("/v1/identities/smiths/bo/exports/diffusers_lora", headers=hr), 400)
    assert "base model" in e["message"]
    e = err(web.client.get("/v1/identities/smiths/bo/exports/diffusers_lora?base_model=../x",
                           headers=hr), 400)
    assert "inside the server's models folder" in e["message"]
    err(web.client.get("/v1/identities/smiths/bo/exports/dreambooth", headers=hr), 404)
    err(web.client.get("/v1/identities/smiths/ana/exports/photomaker?model_id=x", headers=hr),
        403)


# -- jobs -----------------------------------------------------------------------------------------
def test_jobs_submit_status_cancel(web):
    h = web.headers()
    kinds = ok(web.client.get("/v1/job-kinds", headers=h))["items"]
    assert {"kind": "rebuild_index", "scope": "admin", "needs_identity": False} \
        .items() <= next(k for k in kinds if k["kind"] == "rebuild_index").items()
    job = ok(web.client.post("/v1/jobs", headers=h, json={"kind": "rebuild_index"}), 202)
    assert job["status"] == "queued"
    second = ok(web.client.post("/v1/jobs", headers=h, json={"kind": "rebuild_index"}), 202)
    cancelled = ok(web.client.post(f"/v1/jobs/{second['id']}/cancel", headers=h))
    assert cancelled["status"] == "cancelled"
    err(web.client.post(f"/v1/jobs/{second['id']}/cancel", headers=h), 409)
    assert web.state.jobs.run_pending() == 1
    done = ok(web.client.get(f"/v1/jobs/{job['id']}", headers=h))
    assert done["status"] == "done" and done["progress"] == 1.0 and done["result"] == {
        "identities": 0, "vectors": 0}
    listed = ok(web.client.get("/v1/jobs?status=done", headers=h))["items"]
    assert [j["id"] for j in listed] == [job["id"]]
    assert len(ok(web.client.get("/v1/jobs?limit=1", headers=h))["items"]) == 1
    # Valid by the document ('params' is an object), not what the kind takes: 422.
    err(web.client.post("/v1/jobs", headers=h, json={"kind": "generate"}), 422)
    err(web.client.post("/v1/jobs", headers=h, json={"kind": "rebuild_index", "params": {"x": 1}}),
        422)
    err(web.client.get("/v1/jobs/not-a-uuid", headers=h), 404)
    # Another owner never sees it.
    err(web.client.get(f"/v1/jobs/{job['id']}", headers=web.headers("northlight")), 404)
    assert ok(web.client.get("/v1/jobs", headers=web.headers("northlight")))["items"] == []


# -- audit ------------------------------------------------------------------------------------------
def test_audit_list_and_verify(web):
    h = web.headers()
    ok(web.client.post("/v1/identities", headers=h, json={"name": "ana",
                                                          "consent": consent_doc()}), 201)
    events = ok(web.client.get("/v1/audit?limit=2", headers=h))
    assert len(events["items"]) == 2 and events["next_before"] is not None
    assert all(e["owner"] == "smiths" for e in events["items"])
    older = ok(web.client.get(f"/v1/audit?before={events['next_before']}", headers=h))
    assert all(e["seq"] < events["next_before"] for e in older["items"])
    mine = ok(web.client.get("/v1/audit?subject=smiths/ana", headers=h))["items"]
    assert [e["action"] for e in mine] == ["identity.create"]
    # northlight's log holds nothing of smiths.
    theirs = ok(web.client.get("/v1/audit", headers=web.headers("northlight")))["items"]
    assert all(e["owner"] == "northlight" for e in theirs)
    assert not any("smiths" in str(e) for e in theirs)
    v = ok(web.client.get("/v1/audit/verify", headers=h))
    assert v["ok"] and v["owner_events"] >= 3 and v["first_bad_seq"] is None


# -- API keys and members ------------------------------------------------------------------------------
def test_api_keys_create_list_revoke(web):
    h = web.headers()
    created = ok(web.client.post("/v1/api-keys", headers=h, json={
        "name": "render farm", "scopes": ["identities:read", "generate"],
        "expires_in_days": 30}), 201)
    token = created["token"]
    assert token.startswith("idv_") and created["key"]["expires_at"]
    listed = ok(web.client.get("/v1/api-keys", headers=h))["items"]
    assert all("token" not in k and "secret" not in str(k) for k in listed)
    assert token not in str(listed)
    new = {"Authorization": f"Bearer {token}"}
    assert ok(web.client.get("/v1/me", headers=new))["scopes"] == ["generate",
                                                                   "identities:read"]
    revoked = ok(web.client.delete(f"/v1/api-keys/{created['key']['id']}", headers=h))
    assert revoked["status"] == "revoked"
    e = err(web.client.get("/v1/me", headers=new), 401, "unauthorized")
    assert "revoked" in e["message"]
    err(web.client.delete(f"/v1/api-keys/{created['key']['id']}", headers=h), 409)
    # A key can grant only what it holds.
    narrow = web.headers("smiths", "admin")
    err(web.client.post("/v1/api-keys", headers=narrow,
                        json={"name": "x", "scopes": ["artifacts:read"]}), 403)
    err(web.client.post("/v1/api-keys", headers=h, json={"name": "x", "scopes": ["root"]}), 400)


def test_members(web):
    h = web.headers()
    web.user("maria", None)
    assert ok(web.client.get("/v1/owner/members", headers=h))["items"] == []
    m = ok(web.client.put("/v1/owner/members/maria", headers=h, json={"role": "editor"}))
    assert m["username"] == "maria" and m["role"] == "editor"
    assert ok(web.client.put("/v1/owner/members/maria", headers=h,
                             json={"role": "viewer"}))["role"] == "viewer"
    err(web.client.put("/v1/owner/members/maria", headers=h, json={"role": "god"}), 400)
    err(web.client.put("/v1/owner/members/nobody", headers=h, json={"role": "viewer"}), 404)
    assert web.client.delete("/v1/owner/members/maria", headers=h).status_code == 204
    err(web.client.delete("/v1/owner/members/maria", headers=h), 404)
