"""Generation over the API and the UI with the tiny models (`idvault models tiny`): submit a
scene, run the `generate` job, fetch the signed PNG, verify stored and uploaded images,
refusals (consent, other owners, bad params), and the generation page."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from PIL import Image, PngImagePlugin

from tests.helpers import consent_doc
from tests.web.web_fixtures import photo_bytes
from vault import generated_images
from web import generation


@pytest.fixture
def backend() -> str:
    return "sqlite"


def enroll_for_generation(web, handle: str, person: int):
    owner, name = handle.split("/")
    resp = web.client.post(
        f"/v1/identities/{owner}/{name}/enroll", headers=web.headers(owner),
        data={"photos": [(io.BytesIO(photo_bytes(person, i)), f"{name}-{i}.jpg")
                         for i in (0, 1)],
              "consent": json.dumps(consent_doc()), "kinds": "photomaker,storymaker"},
        content_type="multipart/form-data")
    assert resp.status_code == 201, resp.get_data(as_text=True)


def generate(web, owner: str = "smiths", **body):
    resp = web.client.post("/v1/generate", headers=web.headers(owner, "generate"),
                           json={"steps": 2, "seed": 7, **body})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    return resp.get_json()


def run(web, job_id: str, owner: str = "smiths") -> dict:
    web.state.jobs.run_pending()
    return web.client.get(f"/v1/jobs/{job_id}", headers=web.headers(owner)).get_json()


def test_generate_fetch_and_verify(gen_web, tmp_path):
    web = gen_web
    enroll_for_generation(web, "smiths/ana", 1)
    enroll_for_generation(web, "smiths/ben", 2)
    job = generate(web, prompt="@smiths/ana:girl and @smiths/ben on a beach", size=[128, 64],
                   layout="ana=0,0,0.5,1;ben=0.5,0,1,1")
    assert job["kind"] == "generate" and job["status"] == "queued"
    assert job["params"] == {"prompt": "@smiths/ana:girl and @smiths/ben on a beach",
                             "seed": 7, "steps": 2, "size": [128, 64], "method": "auto",
                             "commercial": False, "layout": "ana=0,0,0.5,1;ben=0.5,0,1,1"}
    done = run(web, job["id"])
    assert done["status"] == "done", done
    assert done["progress"] == 1.0 and "step 2 of 2" in done["message"]
    result = done["result"]
    assert result["image"] == f"outputs/{job['id']}.png"
    assert result["identities"] == ["smiths/ana", "smiths/ben"]
    assert set(result["methods"]) == {"smiths/ana", "smiths/ben"}
    assert (result["width"], result["height"], result["seed"]) == (128, 64, 7)
    stored = web.vault.settings.data_dir / result["image"]
    assert stored.is_file()
    # Only the PNG is written there: no decrypted identity data on disk.
    assert [p.name for p in stored.parent.iterdir()] == [stored.name]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == result["sha256"]

    img = web.client.get(f"/v1/jobs/{job['id']}/image", headers=web.headers("smiths",
                                                                             "identities:read"))
    assert img.status_code == 200 and img.mimetype == "image/png"
    assert img.headers["Cache-Control"] == "private, no-store"
    assert hashlib.sha256(img.data).hexdigest() == result["sha256"]
    with Image.open(io.BytesIO(img.data)) as png:
        assert png.size == (128, 64)

    v = web.client.get(f"/v1/jobs/{job['id']}/verify", headers=web.headers()).get_json()
    assert v["status"] == "valid" and v["ok"] is True
    assert [i["handle"] for i in v["manifest"]["identities"]] == ["smiths/ana", "smiths/ben"]
    assert v["summary"][0].endswith("smiths/ana, smiths/ben")

    def verify(data: bytes, name: str = "x.png"):
        return web.client.post("/v1/verify", headers=web.headers(),
                               data={"image": (io.BytesIO(data), name)},
                               content_type="multipart/form-data")

    assert verify(img.data).get_json()["status"] == "valid"
    # One changed pixel: altered, the claim still shown.
    with Image.open(io.BytesIO(img.data)) as png:
        edited, text = png.copy(), dict(png.text)
    info = PngImagePlugin.PngInfo()
    for k, val in text.items():
        info.add_text(k, val)
    edited.putpixel((0, 0), tuple((c + 9) % 256 for c in edited.getpixel((0, 0))))
    buf = io.BytesIO()
    edited.save(buf, "PNG", pnginfo=info)
    doc = verify(buf.getvalue()).get_json()
    assert (doc["status"], doc["reason"], doc["ok"]) == ("altered", "pixels_changed", False)
    assert doc["manifest"]["identities"][0]["handle"] == "smiths/ana"
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, "PNG")
    assert verify(plain.getvalue()).get_json()["status"] == "no_manifest"
    assert verify(photo_bytes(1, 0), "a.jpg").get_json()["status"] == "no_manifest"
    bad = verify(b"not an image")
    assert bad.status_code == 422 and "cannot read" in bad.get_json()["error"]["message"]
    bomb = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(bomb, "PNG")  # 100 MP of zeros: a tiny file
    bad = verify(bomb.getvalue())
    assert bad.status_code == 400 and "too large" in bad.get_json()["error"]["message"]
    huge = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIHDR" + (10**5).to_bytes(4, "big") * 2 \
        + b"\x08\x00\x00\x00\x00" + b"\x00" * 4  # 10 gigapixels claimed, bad CRC
    assert verify(huge).status_code == 422  # unreadable (bad CRC): not an image

    # The job list and the audit trail name the generation.
    events = web.client.get("/v1/audit?subject=smiths/ana", headers=web.headers()).get_json()
    assert any(e["action"] == "generate" and e["actor"] == f"job:{job['id']}"
               for e in events["items"])

    # Erasing an identity the scene shows removes it (more in the test below).
    assert web.client.delete("/v1/identities/smiths/ben", headers=web.headers()
                             ).status_code == 200
    assert not stored.is_file()
    assert web.client.get(f"/v1/jobs/{job['id']}/image", headers=web.headers()
                          ).status_code == 404


def test_refusals_fail_the_job_or_the_request(gen_web):
    web = gen_web
    enroll_for_generation(web, "smiths/ana", 1)
    enroll_for_generation(web, "smiths/ben", 2)
    before = web.client.get("/v1/jobs", headers=web.headers()).get_json()["items"]
    # Refused at submission, nothing queued: consent without 'commercial' (403), a handle
    # of another owner (the same 404 as one that does not exist), a bad mention (422: any
    # text is a prompt by the API's document; what an '@' starts is its meaning).
    for owner, body, status, needle in (
            ("smiths", {"prompt": "@smiths/ana at a launch party", "commercial": True}, 403,
             "commercial"),
            ("northlight", {"prompt": "@smiths/ana in a studio"}, 404, "no identity smiths/ana"),
            ("northlight", {"prompt": "@northlight/ghost in a studio"}, 404,
             "no identity northlight/ghost"),
            ("smiths", {"prompt": "@smiths/Ana!! on a boat"}, 422, "@smiths/Ana")):
        for path, doc in (("/v1/generate", body),
                          ("/v1/jobs", {"kind": "generate", "params": body})):
            resp = web.client.post(path, headers=web.headers(owner), json=doc)
            assert resp.status_code == status, (path, body, resp.get_data(as_text=True))
            assert needle in resp.get_json()["error"]["message"]
            assert set(resp.get_json()) == {"error"}
    assert web.client.get("/v1/jobs", headers=web.headers()).get_json()["items"] == before
    assert web.client.get("/v1/jobs", headers=web.headers("northlight")
                          ).get_json()["items"] == []
    # Consent withdrawn after submission: the job fails with the reason, nothing written.
    job = generate(web, prompt="@smiths/ben at a launch party")
    assert web.client.post("/v1/identities/smiths/ben/consent/withdraw", headers=web.headers(),
                           json={"reason": "changed my mind"}).status_code == 200
    failed = run(web, job["id"])
    assert failed["status"] == "failed", failed
    assert "no identity smiths/ben" in failed["error"]  # erased: the family erases at once
    assert failed["result"] is None
    assert not generated_images.image_path(web.vault.settings.data_dir, job["id"]).exists()
    resp = web.client.get(f"/v1/jobs/{job['id']}/image", headers=web.headers())
    assert resp.status_code == 404 and "no generated image" in resp.get_json()["error"]["message"]
    assert web.client.get(f"/v1/jobs/{job['id']}/verify", headers=web.headers()
                          ).status_code == 404
    # Bad params: 400 at submission, nothing queued.
    before = web.client.get("/v1/jobs", headers=web.headers()).get_json()["items"]
    for body in ({"prompt": ""}, {"prompt": "x", "steps": 0}, {"prompt": "x", "steps": "2"},
                 {"prompt": "x", "size": [100, 64]}, {"prompt": "x", "size": "64x64"},
                 {"prompt": "x", "seed": -1}, {"prompt": "x", "commercial": "yes"},
                 {"prompt": "x", "evil": 1}, {"prompt": "x" * 2001}, {"steps": 2},
                 {"prompt": "x", "layout": 5}):
        resp = web.client.post("/v1/generate", headers=web.headers(), json=body)
        assert resp.status_code == 400, (body, resp.get_data(as_text=True))
        assert resp.get_json()["error"]["code"] == "invalid_input"
    resp = web.client.post("/v1/jobs", headers=web.headers(),
                           json={"kind": "generate", "params": {"prompt": "x", "steps": 999}})
    assert resp.status_code == 422  # 'params' is any object by the document: the kind's say
    assert web.client.get("/v1/jobs", headers=web.headers()).get_json()["items"] == before
    # The generic jobs endpoint takes the same kind.
    resp = web.client.post("/v1/jobs", headers=web.headers(),
                           json={"kind": "generate", "params": {"prompt": "a quiet lake",
                                                                "steps": 1}})
    assert resp.status_code == 202
    assert run(web, resp.get_json()["id"])["status"] == "done"
    kinds = web.client.get("/v1/job-kinds", headers=web.headers()).get_json()["items"]
    assert {"kind": "generate", "scope": "generate"}.items() <= next(
        k for k in kinds if k["kind"] == "generate").items()



def test_what_generate_would_lack_is_refused_at_submission(gen_web, web):
    """The checks of `idvault generate` that need no model run before a job is queued: an
    identity without the artifact its method reads (422: well formed, but not what this
    vault holds; naming the kind and how to make it), and on a server that runs its jobs
    a missing base model (422 too, saying what the operator should do), on both
    endpoints. No job is created."""
    ok = gen_web.enroll("smiths/ana", 1)  # the face artifact only
    assert ok.status_code == 201, ok.get_data(as_text=True)
    jobs_before = gen_web.client.get("/v1/jobs", headers=gen_web.headers()).get_json()["items"]
    for body, needle in (
            ({"prompt": "@smiths/ana reading", "method": "photomaker"},
             "smiths/ana has no photomaker artifact (enroll with --kinds photomaker)"),
            ({"prompt": "@smiths/ana reading", "method": {"@smiths/ana": "lidb"}},
             "smiths/ana has no lidb artifact (fit one with `idvault personalize"),
            ({"prompt": "@smiths/ana reading"},
             "smiths/ana cannot be generated with any method")):
        for path, doc in (("/v1/generate", body),
                          ("/v1/jobs", {"kind": "generate", "params": body})):
            resp = gen_web.client.post(path, headers=gen_web.headers(), json=doc)
            assert resp.status_code == 422, (path, body, resp.get_data(as_text=True))
            error = resp.get_json()["error"]
            assert set(resp.get_json()) == {"error"} and error["code"] == "unprocessable"
            assert needle in error["message"] and error["details"]["handle"] == "smiths/ana"
    assert gen_web.client.get("/v1/jobs", headers=gen_web.headers()
                              ).get_json()["items"] == jobs_before
    # `web` has the face models but no SDXL base model: nothing it could run.
    for path, doc in (("/v1/generate", {"prompt": "a quiet lake"}),
                      ("/v1/jobs", {"kind": "generate", "params": {"prompt": "a quiet lake"}})):
        resp = web.client.post(path, headers=web.headers(), json=doc)
        assert resp.status_code == 422, resp.get_data(as_text=True)
        error = resp.get_json()["error"]
        assert error["code"] == "unprocessable" and "no SDXL base model" in error["message"]
        assert "pytest" not in error["message"]  # the server's folders stay in its log
    assert web.client.get("/v1/jobs", headers=web.headers()).get_json()["items"] == []
    # A scale-out API node holds no models: the workers' base model is theirs to check.
    sent: list[tuple] = []
    web.state.jobs.dispatch = lambda *job: sent.append(job)
    try:
        resp = web.client.post("/v1/generate", headers=web.headers(),
                               json={"prompt": "a quiet lake"})
        assert resp.status_code == 202, resp.get_data(as_text=True)
        assert [j[0] for j in sent] == [resp.get_json()["id"]]
    finally:
        web.state.jobs.dispatch = None

def test_cancel_a_running_generation(gen_web):
    web = gen_web
    job = generate(web, prompt="a quiet lake", steps=3)
    real = generation.pipeline

    def cancelling(vault, models_dir):
        web.state.jobs.cancel(job["id"], owner="smiths")  # asked while it runs
        return real(vault, models_dir)

    generation.pipeline = cancelling
    try:
        done = run(web, job["id"])
    finally:
        generation.pipeline = real
    assert done["status"] == "cancelled", done
    assert not generated_images.image_path(web.vault.settings.data_dir, job["id"]).exists()


def test_erasing_an_identity_removes_the_scenes_that_show_it(gen_web):
    web = gen_web
    enroll_for_generation(web, "smiths/ana", 1)
    enroll_for_generation(web, "smiths/ben", 2)
    both = generate(web, prompt="@smiths/ana and @smiths/ben at a picnic")
    alone = generate(web, prompt="@smiths/ben reading")
    for job in (both, alone):
        assert run(web, job["id"])["status"] == "done"
    read = web.headers("smiths", "identities:read")
    resp = web.client.delete("/v1/identities/smiths/ana", headers=web.headers())
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.get_json()["receipt"]["generated_images_removed"] == 1

    gone = web.client.get(f"/v1/jobs/{both['id']}/image", headers=read)
    assert gone.status_code == 404
    message = gone.get_json()["error"]["message"]
    assert "was removed" in message and "smiths/ana erased" in message
    result = web.client.get(f"/v1/jobs/{both['id']}", headers=read).get_json()["result"]
    assert "image" not in result and result["image_removed"]["reason"].startswith(
        "smiths/ana erased (requested by")
    assert not generated_images.image_path(web.vault.settings.data_dir, both["id"]).exists()
    kept = web.client.get(f"/v1/jobs/{alone['id']}/image", headers=read)
    assert kept.status_code == 200 and kept.mimetype == "image/png"


def test_an_identity_erased_while_its_scene_is_made_leaves_no_image(gen_web):
    web = gen_web
    enroll_for_generation(web, "smiths/ana", 1)
    job = generate(web, prompt="@smiths/ana by a window")
    real = generation.pipeline

    class ErasedMeanwhile:  # the pipeline, with ana erased at its last denoising step
        def __init__(self, pipe) -> None:
            self.pipe = pipe

        def __call__(self, *args, progress, **kwargs):
            def erase_at_the_end(done: int, total: int) -> None:
                progress(done, total)
                if done == total:
                    web.vault.delete_identity("smiths/ana", actor="test")

            return self.pipe(*args, progress=erase_at_the_end, **kwargs)

    generation.pipeline = lambda vault, models_dir: ErasedMeanwhile(real(vault, models_dir))
    try:
        done = run(web, job["id"])
    finally:
        generation.pipeline = real
    assert done["status"] == "failed", done
    assert "smiths/ana" in done["error"]
    assert not generated_images.image_path(web.vault.settings.data_dir, job["id"]).exists()


def test_the_generation_page(gen_web):
    web = gen_web
    enroll_for_generation(web, "smiths/ana", 1)
    web.user("maria", "smiths", "editor")
    web.user("vic", "smiths", "viewer")
    c = web.login("maria")
    page = c.get("/generate").get_data(as_text=True)
    assert 'data-insert-handle="@smiths/ana"' in page and "generate.js" in page
    assert "No scenes yet." in page and 'name="layout"' in page
    # Without JavaScript: the form posts, the job is queued, the page shows it.
    resp = c.post("/generate", data={"csrf_token": c.csrf, "prompt": "@smiths/ana reading",
                                     "steps": "2", "seed": "3", "size": "64x64",
                                     "method": "auto", "layout": ""})
    assert resp.status_code == 302, resp.get_data(as_text=True)[:500]
    assert "queued" in c.get(resp.headers["Location"]).get_data(as_text=True)
    bad = c.post("/generate", data={"csrf_token": c.csrf, "prompt": "x", "size": "big"})
    assert bad.status_code == 400 and "WIDTHxHEIGHT" in bad.get_data(as_text=True)
    assert c.post("/generate", data={"prompt": "x"}).status_code == 403  # no CSRF token
    web.state.jobs.run_pending()
    page = c.get("/generate").get_data(as_text=True)
    job_id = web.state.jobs.list("smiths")[0]["id"]
    assert f'src="/v1/jobs/{job_id}/image"' in page and "provenance valid" in page
    result = c.get(f"/generate/{job_id}").get_data(as_text=True)
    assert "Provenance" in result and "valid, signed by this vault" in result
    assert "smiths/ana via photomaker" in result
    assert c.get(f"/v1/jobs/{job_id}/image").status_code == 200  # the session sees it
    assert c.get("/generate/00000000-0000-0000-0000-000000000000").status_code == 404
    # A viewer sees the gallery, not the form, and cannot submit.
    v = web.login("vic")
    page = v.get("/generate").get_data(as_text=True)
    assert "cannot" not in page and "can see the gallery but not generate" in page
    assert f'src="/v1/jobs/{job_id}/image"' in page
    assert v.post("/generate", data={"csrf_token": v.csrf, "prompt": "x"}).status_code == 403


def test_four_identities_with_four_methods_in_one_scene(gen_web):
    """Issue 15: four people in one image over the API, each with its own method (two of them
    the adapters: FaceID Plus v2 and InstantID), and the provenance naming each."""
    web = gen_web
    methods = {"smiths/ana": "photomaker", "smiths/ben": "storymaker", "smiths/cai": "faceid",
               "smiths/dee": "instantid"}
    for person, handle in enumerate(methods, 1):
        owner, name = handle.split("/")
        resp = web.client.post(
            f"/v1/identities/{owner}/{name}/enroll", headers=web.headers(owner),
            data={"photos": [(io.BytesIO(photo_bytes(person, i)), f"{name}-{i}.jpg")
                             for i in (0, 1)],
                  "consent": json.dumps(consent_doc()),
                  "kinds": f"face,{methods[handle]}"},
            content_type="multipart/form-data")
        assert resp.status_code == 201, resp.get_data(as_text=True)
    prompt = ("@smiths/ana:girl, @smiths/ben:man, @smiths/cai:woman and @smiths/dee:boy "
              "on a beach")
    # Names the API checks before queueing: an unknown method, a handle not in the prompt.
    # (400: against the document; 422: valid by it, refused for what the prompt says)
    for bad, status, needle in (({"@smiths/ana": "dreambooth"}, 400, "'method' must be one of"),
                                ({"@smiths/zed": "faceid"}, 422, "does not mention: @smiths/zed")):
        resp = web.client.post("/v1/generate", headers=web.headers("smiths", "generate"),
                               json={"prompt": prompt, "method": bad})
        assert resp.status_code == status and needle in resp.get_json()["error"]["message"], \
            resp.get_data(as_text=True)
    job = generate(web, prompt=prompt, size=[128, 64],
                   method={f"@{h}": m for h, m in methods.items()})
    assert job["params"]["method"] == methods
    done = run(web, job["id"])
    assert done["status"] == "done", done
    assert done["result"]["methods"] == methods
    v = web.client.get(f"/v1/jobs/{job['id']}/verify", headers=web.headers()).get_json()
    assert v["status"] == "valid", v
    used = {i["handle"]: i for i in v["manifest"]["identities"]}
    assert {h: used[h]["method"] for h in methods} == methods
    kinds = {h: web.vault.describe(h)["artifacts"] for h in methods}
    for handle, method in methods.items():
        artifact = next(a for a in kinds[handle] if a["kind"] == method)
        [use] = used[handle]["artifacts"]
        assert (use["id"], use["kind"], use["sha256"]) == (artifact["id"], method,
                                                          artifact["sha256"]), use
    adapters = " ".join(v["manifest"]["adapters"])
    assert "ip-adapter-faceid-plusv2_sdxl.bin" in adapters and "ControlNetModel" in adapters


def test_the_method_names_the_api_checks_are_the_generators_methods():
    from generators.methods import METHODS

    assert generation.METHOD_CHOICES == ("auto", *METHODS)
