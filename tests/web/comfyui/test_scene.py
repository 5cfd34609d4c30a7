"""The "idvault Scene" node against a real server on loopback with the tiny generator of the
API generation tests (`idvault models tiny`, tests/web/test_generation.py's enrollment):
the node submits the scene, follows the job with progress, returns the signed image as a
ComfyUI IMAGE and the manifest naming the handles; refusals are clear errors."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.web.test_generation import enroll_for_generation
from web.comfyui.client import ConsentRefused, NotFoundError, ScopeError
from web.comfyui.scene import METHODS, IdvaultScene


def _inputs(url: str, key: str, **over) -> dict:
    return {"server_url": url, "api_key_env": "IDVAULT_TEST_UNSET", "api_key": key,
            "prompt": "@smiths/ana:girl and @smiths/ben on a beach", "seed": 7, "steps": 2,
            "width": 128, "height": 64, "method": "auto", **over}


def test_scene_returns_the_signed_image_and_its_manifest(gen_web, live_gen):
    web = gen_web
    enroll_for_generation(web, "smiths/ana", 1)
    enroll_for_generation(web, "smiths/ben", 2)
    key = web.key("smiths", "generate", "identities:read")
    seen: list[tuple[int, int]] = []
    inputs = _inputs(live_gen, key, layout="ana=0,0,0.5,1;ben=0.5,0,1,1")
    image, manifest = IdvaultScene().generate(**inputs, progress=lambda v, t: seen.append((v, t)))

    assert image.shape == (1, 64, 128, 3) and image.dtype.is_floating_point
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert seen and seen[-1] == (1000, 1000) and all(t == 1000 for _, t in seen)
    doc = json.loads(manifest)
    assert [i["handle"] for i in doc["identities"]] == ["smiths/ana", "smiths/ben"]
    assert doc["seed"] == 7
    # The IMAGE is exactly the stored, signed PNG's pixels.
    job = web.client.get("/v1/jobs?status=done", headers=web.headers()).get_json()["items"][0]
    png = web.client.get(f"/v1/jobs/{job['id']}/image", headers=web.headers()).data
    assert hashlib.sha256(png).hexdigest() == job["result"]["sha256"]
    with Image.open(io.BytesIO(png)) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    np.testing.assert_array_equal(image[0].numpy(), pixels)

    version = IdvaultScene.IS_CHANGED(**inputs)
    assert version == IdvaultScene.IS_CHANGED(**inputs)
    assert "smiths/ana:" in version and "smiths/ben:" in version
    # A re-enrolled identity changes IS_CHANGED: ComfyUI will not reuse the old image.
    enroll_again = web.client.delete("/v1/identities/smiths/ben", headers=web.headers())
    assert enroll_again.status_code == 200
    with pytest.raises(NotFoundError, match="no identity smiths/ben"):
        IdvaultScene.IS_CHANGED(**inputs)
    with pytest.raises(NotFoundError, match="smiths/ben"):
        IdvaultScene().generate(**inputs)


def test_scene_refusals(gen_web, live_gen):
    web = gen_web
    enroll_for_generation(web, "smiths/ana", 1)
    node = IdvaultScene()
    with pytest.raises(ScopeError, match="generate"):
        node.generate(**_inputs(live_gen, web.key("smiths", "identities:read"),
                                prompt="@smiths/ana at home"))
    key = web.key("smiths", "generate", "identities:read")
    with pytest.raises(ConsentRefused, match="commercial"):
        IdvaultScene.IS_CHANGED(**_inputs(live_gen, key, prompt="@smiths/ana", commercial=True))
    with pytest.raises(ConsentRefused, match="commercial"):
        node.generate(**_inputs(live_gen, key, prompt="@smiths/ana at home", commercial=True))


def test_method_choices_are_the_servers():
    from generators.methods import METHODS as SERVER_METHODS

    assert set(METHODS) == {"auto", *SERVER_METHODS}
