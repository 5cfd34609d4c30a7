"""The ``reactor`` and ``ip_adapter_embeds`` exports (encoders.adapter_exports) through the
library's ``export``: the files load the way ReActor and diffusers load them, hold the
identity's embeddings, and need consent ``share`` (an audited read).

ReActor is not installed: ``load_reactor_face_model`` below is a reimplementation of its
``reactor_utils.load_face_model`` (Gourieff/comfyui-reactor-node, the same code in
sd-webui-reactor's ``reactor_helpers.py``): ``safe_open(framework="pt")``, every key's tensor
``.numpy()`` into insightface's ``Face``. The expected keys, dtypes and shapes are what its
``save_face_model`` writes from an insightface ``Face``, written out here from that code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from insightface.app.common import Face
from safetensors import safe_open

from encoders.fitting.exports import FORMATS, export
from tests.encoders.adapter_payloads import BUFFALO_ID, face_payload, faceid_payload
from tests.helpers import consent
from vault import audit, codec
from vault.errors import ConsentError, InvalidInput, NotFound

SHARE = ["enroll", "generate", "share"]
# save_face_model: torch.tensor(face[key]) of insightface's arrays (SCRFD boxes/points and
# the landmark models are float32; genderage gives np.argmax (int64) and int(round(...))).
REACTOR_KEYS = {
    "bbox": (torch.float32, (4,)), "kps": (torch.float32, (5, 2)),
    "det_score": (torch.float32, ()), "landmark_3d_68": (torch.float32, (68, 3)),
    "pose": (torch.float32, (3,)), "landmark_2d_106": (torch.float32, (106, 2)),
    "embedding": (torch.float32, (512,)), "gender": (torch.int64, ()),
    "age": (torch.int64, ()),
}


@pytest.fixture
def backend() -> str:
    return "sqlite"


def load_reactor_face_model(path) -> tuple[Face, dict]:
    """ReActor's load_face_model, plus the torch dtypes and shapes it saw."""
    face, seen = {}, {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            seen[k] = (t.dtype, tuple(t.shape))
            face[k] = t.numpy()
    return Face(face), seen


def test_reactor_face_model_loads_like_reactor_and_holds_the_identity(family, tmp_path):
    family.create_identity("smiths/ana", consent(purposes=SHARE), actor="test")
    payload = face_payload(1, photos=3)
    family.put_artifact("smiths/ana", "face", payload, actor="test")
    out = export(family, "smiths/ana", "reactor", actor="tester")
    path = tmp_path / "ana.safetensors"
    path.write_bytes(out.data)

    face, seen = load_reactor_face_model(path)
    assert seen == REACTOR_KEYS
    raw = codec.decode(payload).tensors["embeddings"]
    # ReActor's Blend "Mean" of these photos: np.mean over the raw embeddings, the same op.
    np.testing.assert_array_equal(face.embedding, np.mean(raw, axis=0))
    # What inswapper reads: normed_embedding. The mean of three random 512-d directions
    # is far from each one (cosine ~0.58) and from another identity's.
    normed = face.normed_embedding
    assert abs(np.linalg.norm(normed) - 1) < 1e-6
    other = face_payload(2, photos=3)
    other_mean = codec.decode(other).tensors["embeddings"].mean(0)
    assert float(normed @ (other_mean / np.linalg.norm(other_mean))) < 0.2
    assert all(float(normed @ (r / np.linalg.norm(r))) > 0.4 for r in raw)
    # The source-face sort ReActor applies to a loaded model (largest box first) works.
    assert sorted([face], key=lambda x: (x.bbox[2] - x.bbox[0]) * (x.bbox[3] - x.bbox[1]),
                  reverse=True)[0] is face
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["model_id"] == BUFFALO_ID and meta["photos"] == "3"
    assert set(meta["idvault.placeholders"].split(",")) == {
        "det_score", "landmark_3d_68", "pose", "landmark_2d_106", "gender", "age"}
    # The read is audited with purpose share.
    with family.session() as s:
        reads = [e for e in audit.events(s, subject="smiths/ana") if e.action == "artifact.read"]
    assert reads[-1].details["purpose"] == "share" and reads[-1].actor == "tester"


def test_one_photo_face_model_is_that_photo_s_embedding(family):
    family.create_identity("smiths/ana", consent(purposes=SHARE), actor="test")
    payload = face_payload(3, photos=1)
    family.put_artifact("smiths/ana", "face", payload, actor="test")
    data = export(family, "smiths/ana", "reactor").data
    from safetensors.numpy import load

    np.testing.assert_array_equal(load(data)["embedding"],
                                  codec.decode(payload).tensors["embeddings"][0])


def test_reactor_refusals(family):
    family.create_identity("smiths/ana", consent(), actor="test")  # no 'share'
    family.put_artifact("smiths/ana", "face", face_payload(1), actor="test")
    with pytest.raises(ConsentError, match="share"):
        export(family, "smiths/ana", "reactor")
    family.create_identity("smiths/ben", consent(purposes=SHARE), actor="test")
    family.put_artifact("smiths/ben", "face",
                        face_payload(2, model_id="antelopev2/glintr100.onnx@0123456789abcdef"),
                        actor="test")
    with pytest.raises(InvalidInput, match="needs buffalo_l embeddings.*antelopev2"):
        export(family, "smiths/ben", "reactor")
    with pytest.raises(InvalidInput, match="antelopev2"):  # refused before any decryption
        export(family, "smiths/ben", "reactor", model_id="antelopev2/x")
    with pytest.raises(NotFound, match="no faceid artifact"):
        export(family, "smiths/ben", "ip_adapter_embeds")
    assert "reactor" in FORMATS and "ip_adapter_embeds" in FORMATS


def test_ip_adapter_embeds_fit_diffusers_faceid_plus_projection(family):
    """Shapes against diffusers 0.42's IPAdapterFaceIDPlusImageProjection (tiny config,
    random weights) through MultiIPAdapterImageProjection and the SDXL pipeline's own
    ``prepare_ip_adapter_image_embeds``, which splits negatives from positives."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.models.embeddings import (
        IPAdapterFaceIDPlusImageProjection,
        MultiIPAdapterImageProjection,
    )
    from safetensors.torch import load

    family.create_identity("smiths/ana", consent(purposes=SHARE), actor="test")
    payload = faceid_payload(5, photos=2, dtype="float32")
    family.put_artifact("smiths/ana", "faceid", payload, actor="test")
    stored = codec.decode(payload).tensors
    e = load(export(family, "smiths/ana", "ip_adapter_embeds").data)
    n, positions, clip_dim = stored["clip_embeds"].shape
    assert e["id_embeds"].shape == (2, n, 1, 512)
    assert e["clip_embeds"].shape == (2, n, positions, clip_dim)
    # Negatives first: zero id embeddings and the CLIP features of an all-zero image.
    assert not e["id_embeds"][0].any()
    np.testing.assert_array_equal(e["id_embeds"][1, :, 0].numpy(), stored["normed"])
    np.testing.assert_array_equal(e["clip_embeds"][1].numpy(), stored["clip_embeds"])
    for i in range(n):
        np.testing.assert_array_equal(e["clip_embeds"][0, i].numpy(), stored["clip_negative"])

    # The pipeline's own split of precomputed embeds (CFG on): chunk(2) -> negative, positive.
    torch.manual_seed(0)
    embeds = StableDiffusionXLPipeline.prepare_ip_adapter_image_embeds(
        None, None, [e["id_embeds"]], torch.device("cpu"), 1, True)
    assert len(embeds) == 1 and torch.equal(embeds[0], e["id_embeds"])

    proj = IPAdapterFaceIDPlusImageProjection(
        embed_dims=32, output_dims=32, hidden_dims=clip_dim, id_embeddings_dim=512, depth=1,
        dim_head=8, heads=4, num_tokens=4, ffn_ratio=2, ffproj_ratio=2).eval()
    proj.clip_embeds = e["clip_embeds"]
    proj.shortcut = True  # Plus v2
    with torch.no_grad():
        out = MultiIPAdapterImageProjection([proj])(embeds)[0]
        assert out.shape == (2, n, 4, 32)  # (cfg halves, images, id tokens, cross dim)
        # Row i of the positive half is photo i's own projection: the same computation on
        # one (id, clip) pair. Different batch sizes may take different BLAS paths in
        # float32, so compare within 1e-5 (values are O(1) after the output LayerNorm).
        for i in range(n):
            proj.clip_embeds = torch.from_numpy(stored["clip_embeds"][i])[None, None]
            alone = proj(torch.from_numpy(stored["normed"][i])[None, None])
            torch.testing.assert_close(out[1, i], alone[0], rtol=1e-5, atol=1e-5)
        proj.clip_embeds = torch.from_numpy(stored["clip_negative"])[None, None]
        negative = proj(torch.zeros(1, 1, 512))
        torch.testing.assert_close(out[0, 0], negative[0], rtol=1e-5, atol=1e-5)


def test_ip_adapter_embeds_keep_the_stored_dtype(family):
    from safetensors.numpy import load

    family.create_identity("smiths/ana", consent(purposes=SHARE), actor="test")
    family.put_artifact("smiths/ana", "faceid", faceid_payload(6, photos=1), actor="test")
    e = load(export(family, "smiths/ana", "ip_adapter_embeds").data)
    assert e["id_embeds"].dtype == np.float16 and e["clip_embeds"].dtype == np.float16
    # A studio keeps a withdrawn identity's record (erase policy 'retain'): refused by consent.
    family.create_identity("northlight/cy", consent(purposes=SHARE), actor="test")
    family.put_artifact("northlight/cy", "faceid", faceid_payload(7, photos=1), actor="test")
    assert load(export(family, "northlight/cy", "ip_adapter_embeds").data)["id_embeds"].shape \
        == (2, 1, 1, 512)
    family.withdraw_consent("northlight/cy", actor="test")
    with pytest.raises(ConsentError, match="withdrawn"):
        export(family, "northlight/cy", "ip_adapter_embeds")
