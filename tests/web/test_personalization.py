"""Personalisation over the API: photos staged sealed under the identity's key, a
``celeb_basis`` / ``lidb`` job fitted on the tiny SDXL model, the stage gone when the job
ends; refusals (consent, bad photos, base models, the generic jobs endpoint) store
nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.helpers import consent_doc
from tests.web.web_fixtures import TWIN_OF_3, photo_bytes
from vault import identities


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Fits on one torch thread (reproducible, and faster on a shared CPU)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PURPOSES = ["enroll", "generate", "personalize", "share"]


def enroll(web, name: str, person: int, purposes=PURPOSES, kin=None) -> str:
    resp = web.client.post(
        f"/v1/identities/smiths/{name}/enroll", headers=web.headers(),
        data={"photos": [(io.BytesIO(photo_bytes(person, i, kin=kin)), f"{name}-{i}.jpg")
                         for i in (0, 1)],
              "consent": json.dumps(consent_doc(purposes=purposes))},
        content_type="multipart/form-data")
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return f"smiths/{name}"


def personalize(web, name: str, kind: str, photos=None, owner: str = "smiths", **fields):
    photos = photos if photos is not None else [
        (photo_bytes(1, i), f"face-{i}.jpg") for i in (0, 1)]
    data = {"kind": kind, "photos": [(io.BytesIO(b), n) for b, n in photos],
            **{k: str(v) for k, v in fields.items()}}
    return web.client.post(f"/v1/identities/{owner}/{name}/personalize",
                           headers=web.headers(owner, "generate"), data=data,
                           content_type="multipart/form-data")


def staged_root(web) -> Path:
    return Path(web.vault.settings.data_dir) / "staged"


def stages(web) -> list[Path]:
    root = staged_root(web)
    return sorted(p for d in root.iterdir() for p in d.iterdir()) if root.is_dir() else []


def jobs(web) -> list[dict]:
    return web.client.get("/v1/jobs", headers=web.headers()).get_json()["items"]


def test_lidb_over_the_api_fits_and_drops_the_staged_photos(gen_web):
    web = gen_web
    handle = enroll(web, "ana", 1)
    resp = personalize(web, "ana", "lidb", steps=2, seed=3)
    assert resp.status_code == 202, resp.get_data(as_text=True)
    job = resp.get_json()
    assert job["kind"] == "lidb" and job["status"] == "queued"
    assert job["identity"] == handle
    params = job["params"]
    assert params["base_model"] == "sdxl-tiny" and params["steps"] == 2
    assert params["staged"]["names"] == ["face-0.jpg", "face-1.jpg"]
    # Nothing in the params names a server path or holds pixels.
    assert str(web.state.config.models_dir) not in json.dumps(params)
    assert str(web.vault.settings.data_dir) not in json.dumps(params)
    [stage] = stages(web)
    assert stage.name == params["staged"]["id"]
    sealed = sorted(stage.iterdir())
    assert [p.name for p in sealed] == ["0.sealed", "1.sealed"]
    assert photo_bytes(1, 0)[:64] not in sealed[0].read_bytes()  # sealed, not copied

    web.state.jobs.run_pending()
    done = web.client.get(f"/v1/jobs/{job['id']}", headers=web.headers()).get_json()
    assert done["status"] == "done", done
    assert done["result"]["kind"] == "lidb" and done["result"]["steps"] == 2
    assert done["result"]["model_id"].startswith("sdxl-tiny@")
    assert stages(web) == []  # the photos are gone with the job
    arts = web.client.get("/v1/identities/smiths/ana/artifacts",
                          headers=web.headers()).get_json()["items"]
    assert "lidb" in {a["kind"] for a in arts}
    events = web.client.get("/v1/audit?limit=200", headers=web.headers()).get_json()["items"]
    staged = [e for e in events if e["action"] == "photos.stage"]
    assert len(staged) == 1 and staged[0]["subject"] == handle
    assert staged[0]["details"]["photos"] == 2
    assert "sha256" not in json.dumps(staged[0]["details"])


def test_celeb_basis_over_the_api(gen_web):
    web = gen_web
    enroll(web, "ben", 2)
    resp = personalize(web, "ben", "celeb_basis", steps=2)
    assert resp.status_code == 202, resp.get_data(as_text=True)
    web.state.jobs.run_pending()
    done = web.client.get(f"/v1/jobs/{resp.get_json()['id']}",
                          headers=web.headers()).get_json()
    assert done["status"] == "done", done
    assert done["result"]["kind"] == "celeb_basis"
    assert stages(web) == []


def test_refusals_stage_and_queue_nothing(gen_web):
    web = gen_web
    enroll(web, "cy", 3, purposes=["enroll", "generate"])
    enroll(web, "di", 5)
    # Consent without 'personalize': refused before the photos are kept.
    resp = personalize(web, "cy", "lidb")
    assert resp.status_code == 403 and "personalize" in resp.get_json()["error"]["message"]
    # Held for review (resembles cy): refused until the review is decided.
    enroll(web, "cyd", 4, kin=TWIN_OF_3)
    resp = personalize(web, "cyd", "lidb")
    assert resp.status_code == 409 and "held for review" in resp.get_json()["error"]["message"]
    # A file that is not an image: one result per photo, named.
    resp = personalize(web, "di", "lidb", photos=[(photo_bytes(5, 0), "good.jpg"),
                                                  (b"%PDF-1.4 not a photo", "cv.pdf")])
    assert resp.status_code == 422, resp.get_data(as_text=True)
    results = resp.get_json()["error"]["details"]["photos"]
    assert [(r["photo"], r["ok"]) for r in results] == [("good.jpg", True), ("cv.pdf", False)]
    for fields, needle in (({"base_model": "../sdxl-tiny"}, "no base model"),
                           ({"base_model": "nope"}, "installed: sdxl-tiny"),
                           ({"steps": 0}, "'steps'"), ({"steps": "ten"}, "'steps'"),
                           ({"mode": "scratch"}, "lidb only"), ({"seed": -1}, "'seed'")):
        resp = personalize(web, "di", "celeb_basis", **fields)
        assert resp.status_code == 400, (fields, resp.get_data(as_text=True))
        assert needle in resp.get_json()["error"]["message"], fields
    resp = personalize(web, "di", "dreambooth")
    assert resp.status_code == 400 and "'kind'" in resp.get_json()["error"]["message"]
    resp = personalize(web, "di", "lidb", photos=[])
    assert resp.status_code == 400 and "photos" in resp.get_json()["error"]["message"]
    resp = web.client.post("/v1/identities/smiths/di/personalize", headers=web.headers(),
                           json={"kind": "lidb"})
    assert resp.status_code == 415
    # Another owner's identity: the same 404 as one that does not exist.
    other = personalize(web, "di", "lidb", owner="northlight")
    assert other.status_code == 404
    assert personalize(web, "nobody", "lidb").status_code == 404
    assert stages(web) == [] and jobs(web) == []


def test_the_generic_jobs_endpoint_refuses_path_taking_kinds(gen_web, tmp_path):
    web = gen_web
    handle = enroll(web, "eve", 5)
    secret = tmp_path / "secret.png"
    secret.write_bytes(photo_bytes(5, 0))
    for kind in ("lidb", "celeb_basis"):
        resp = web.client.post("/v1/jobs", headers=web.headers(), json={
            "kind": kind, "identity": handle,
            "params": {"photos": [str(secret)], "base_model": str(tmp_path)}})
        assert resp.status_code == 400, resp.get_data(as_text=True)
        assert "/personalize" in resp.get_json()["error"]["message"]
        # Forged staged params are refused the same way.
        resp = web.client.post("/v1/jobs", headers=web.headers(), json={
            "kind": kind, "identity": handle, "params": {
                "staged": {"id": "0" * 32, "names": ["a"], "sha256": ["0" * 64]},
                "base_model": "sdxl-tiny"}})
        assert resp.status_code == 400
    assert jobs(web) == []
    kinds = {k["kind"]: k for k in web.client.get("/v1/job-kinds",
                                                  headers=web.headers()).get_json()["items"]}
    assert kinds["lidb"]["trusted_params"] and not kinds["generate"]["trusted_params"]


def test_cancel_and_erasure_drop_the_staged_photos(gen_web):
    web = gen_web
    enroll(web, "fay", 6)
    enroll(web, "gus", 7)
    first = personalize(web, "fay", "lidb", steps=2).get_json()
    second = personalize(web, "gus", "lidb", steps=2).get_json()
    assert len(stages(web)) == 2
    cancelled = web.client.post(f"/v1/jobs/{first['id']}/cancel", headers=web.headers())
    assert cancelled.get_json()["status"] == "cancelled"
    assert [p.name for p in stages(web)] == [second["params"]["staged"]["id"]]
    with web.vault.session() as s:
        uid = identities.get_identity(s, "smiths/gus").uid
    assert (staged_root(web) / uid).is_dir()
    resp = web.client.delete("/v1/identities/smiths/gus", headers=web.headers())
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert stages(web) == [] and not (staged_root(web) / uid).exists()
    assert web.state.jobs.run_pending() == 0  # the erased identity's job went with it


def test_the_identity_page_queues_a_fit(gen_web):
    web = gen_web
    enroll(web, "hal", 8)
    enroll(web, "ivy", 9, purposes=["enroll", "generate"])
    web.user("edith", "smiths", "editor")
    web.user("vic", "smiths", "viewer")
    editor = web.login("edith")
    page = editor.get("/identities/smiths/hal").get_data(as_text=True)
    assert "Personalise" in page and '<option value="sdxl-tiny">' in page
    # No form where consent does not grant personalize, nor for a viewer.
    assert "Queue the fit" not in editor.get("/identities/smiths/ivy").get_data(as_text=True)
    viewer = web.login("vic")
    assert "Queue the fit" not in viewer.get("/identities/smiths/hal").get_data(as_text=True)

    def form(person: int, csrf: str | None) -> dict:
        data = {"kind": "lidb", "steps": "2", "base_model": "sdxl-tiny",
                "photos": [(io.BytesIO(photo_bytes(person, 0)), f"{person}.jpg")]}
        return {**data, "csrf_token": csrf} if csrf else data

    def post(client, name: str, person: int, csrf: str | None, **kw):
        return client.post(f"/identities/smiths/{name}/personalize", data=form(person, csrf),
                           content_type="multipart/form-data", **kw)

    assert post(viewer, "hal", 8, viewer.csrf).status_code == 403
    assert post(editor, "hal", 8, None).status_code == 403  # no CSRF token
    assert jobs(web) == [] and stages(web) == []
    resp = post(editor, "hal", 8, editor.csrf, follow_redirects=True)
    assert resp.status_code == 200
    assert "Queued a lidb fit for smiths/hal" in resp.get_data(as_text=True)
    [job] = jobs(web)
    assert job["kind"] == "lidb" and job["params"]["staged"]["names"] == ["8.jpg"]
    assert len(stages(web)) == 1
    # A refusal is shown on the page; nothing more is queued or staged.
    text = post(editor, "ivy", 9, editor.csrf, follow_redirects=True).get_data(as_text=True)
    assert "Not queued" in text and "personalize" in text
    assert len(jobs(web)) == 1 and len(stages(web)) == 1
