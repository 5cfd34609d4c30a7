"""The API's enrollment of the adapter kinds (faceid, instantid) and
POST /v1/identities/{owner}/{name}/kinds, in process and as a worker's job."""

from __future__ import annotations

import io
import json

import pytest

from tests.helpers import consent_doc
from tests.web.web_fixtures import SECRET, Web, photo_bytes
from web.app import WebConfig, create_app


@pytest.fixture(scope="module")
def kinds_models(tmp_path_factory):
    """The tiny buffalo_l and antelopev2 packs and CLIP ViT-H/14 tower in one models folder."""
    from encoders.standins.face_pack import write_tiny_face_pack
    from encoders.standins.id_models import write_tiny_clip_vision

    root = tmp_path_factory.mktemp("api_kinds_models")
    write_tiny_face_pack(root / "models" / "buffalo_l")
    write_tiny_face_pack(root / "models" / "antelopev2", pack="antelopev2")
    write_tiny_clip_vision(root / "clip-vit-h-14", seed=5)
    return root


@pytest.fixture
def web(family, kinds_models):
    app = create_app(WebConfig(vault=family, models_dir=kinds_models, run_jobs=False,
                               secret_key=SECRET))
    yield Web(app, family)
    app.extensions["idvault"].close()


def add(web: Web, handle: str, *, kinds: str, photos=(), replace=None, person: int = 1):
    owner, name = handle.split("/")
    data: dict = {"kinds": kinds}
    if photos:
        data["photos"] = [(io.BytesIO(photo_bytes(person, i)), f"{name}-{i}.jpg")
                          for i in photos]
    if replace is not None:
        data["replace"] = replace
    return web.client.post(f"/v1/identities/{owner}/{name}/kinds", data=data,
                           headers=web.headers(owner), content_type="multipart/form-data")


def body(resp, status):
    assert resp.status_code == status, resp.get_data(as_text=True)[:1000]
    return resp.get_json()


def test_enroll_takes_the_adapter_kinds(web):
    owner, name = "smiths", "ana"
    data = {"photos": [(io.BytesIO(photo_bytes(1, i)), f"a{i}.jpg") for i in (0, 1)],
            "consent": json.dumps(consent_doc()),
            "kinds": "faceid,instantid"}
    report = body(web.client.post(f"/v1/identities/{owner}/{name}/enroll", data=data,
                                  headers=web.headers(), content_type="multipart/form-data"),
                  201)
    assert [a["kind"] for a in report["artifacts"]] == ["face", "faceid", "instantid"]


def test_add_kinds_without_photos_then_with_them(web):
    body(web.enroll("smiths/ana", 1, (0, 1)), 201)
    e = body(add(web, "smiths/ana", kinds="faceid,instantid"), 422)["error"]
    assert "vault keeps no photos" in e["message"]
    assert set(e["details"]["needs_photos"]) == {"faceid", "instantid"}
    wrong = body(add(web, "smiths/ana", kinds="instantid", photos=(0,), person=2), 422)
    assert [p["ok"] for p in wrong["error"]["details"]["photos"]] == [False]
    done = body(add(web, "smiths/ana", kinds="faceid,instantid", photos=(2, 3)), 200)
    assert done["status"] == "added" and len(done["photos"]) == 2
    assert [a["kind"] for a in done["artifacts"]] == ["faceid", "instantid"]
    same = body(web.client.post("/v1/identities/smiths/ana/kinds", json={"kinds": ["faceid"]},
                                headers=web.headers()), 200)
    assert same["status"] == "unchanged" and list(same["present"]) == ["faceid"]
    clash = body(add(web, "smiths/ana", kinds="faceid", photos=(4,)), 409)
    assert "already holds faceid" in clash["error"]["message"]
    again = body(add(web, "smiths/ana", kinds="faceid", photos=(4,), replace="true"), 200)
    assert again["artifacts"][0]["replaced"] == done["artifacts"][0]["id"]
    body(add(web, "smiths/nobody", kinds="faceid"), 404)
    body(add(web, "northlight/ana", kinds="faceid"), 404)  # another owner's: not found
    body(add(web, "smiths/ana", kinds="face"), 400)
    body(web.client.post("/v1/identities/smiths/ana/kinds", json={"kinds": ["faceid"],
                                                                  "extra": 1},
                         headers=web.headers()), 400)


def test_add_kinds_needs_the_write_scope(web):
    body(web.enroll("smiths/ana", 1, (0,)), 201)
    resp = web.client.post("/v1/identities/smiths/ana/kinds", json={"kinds": ["faceid"]},
                           headers=web.headers("smiths", "identities:read"))
    assert resp.status_code == 403


def test_on_a_scale_out_node_photos_become_a_job_for_a_worker(web):
    body(web.enroll("smiths/ana", 1, (0, 1)), 201)
    jobs = web.state.jobs
    sent: list[tuple] = []
    jobs.dispatch = lambda *job: sent.append(job)
    try:
        job = body(add(web, "smiths/ana", kinds="instantid", photos=(2,)), 202)
        assert sent == [(job["id"], "enroll", "cpu")]
        assert job["params"]["mode"] == "add_kinds"
        # Without photos no job is needed: the node answers from the vault.
        body(add(web, "smiths/ana", kinds="faceid"), 422)
        verdict, claimed = jobs.claim_job(job["id"])
        assert verdict == "run"
        jobs.run_job(claimed)
        finished = jobs.get(job["id"])
        assert finished["status"] == "done", finished["error"]
        assert finished["result"]["artifacts"][0]["kind"] == "instantid"
    finally:
        jobs.dispatch = None
