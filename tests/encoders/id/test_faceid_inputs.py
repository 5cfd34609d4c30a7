"""The ``faceid`` artifact (IP-Adapter-FaceID Plus v2 inputs) made at enrollment, with the
tiny face pack and the tiny CLIP ViT-H/14 stand-in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from insightface.utils import face_align

from encoders.enrollment import Enroller
from encoders.id.clip_vision import TINY_VIT_L, ClipVisionTower, clip_preprocess
from encoders.id.faceid_inputs import FaceIDEncoder, clip_model_id, select_photos
from encoders.standins.synthetic_faces import SyntheticFace, synthetic_face, synthetic_photo
from tests.helpers import consent
from vault.artifact_kinds import FACEID_MAX_PHOTOS
from vault.errors import InvalidInput, ModelUnavailable


@pytest.fixture(scope="module")
def clip_models(tmp_path_factory):
    """A models folder holding only the tiny ``clip-vit-h-14`` tower."""
    from encoders.standins.id_models import write_tiny_clip_vision

    root = tmp_path_factory.mktemp("faceid_models")
    write_tiny_clip_vision(root / "clip-vit-h-14", seed=5)
    return root


@pytest.fixture
def enroller(family, analyzer, clip_models, one_torch_thread):
    return Enroller(family, analyzer, clip_models)


def _sized(person: int, photo: int, radius: float) -> np.ndarray:
    return synthetic_photo([SyntheticFace(person, radius=radius)], photo, 256)


def test_features_are_the_tower_on_the_official_224_crop(enroller, family):
    photos = [synthetic_face(1, i) for i in range(3)]
    report = enroller.enroll("smiths/ana", photos, names=["a", "b", "c"], consent=consent(),
                             kinds=["face", "faceid"])
    assert [a.kind for a in report.artifacts] == ["face", "faceid"]
    art = family.get_artifact("smiths/ana", "faceid").artifact  # decoded against the schema
    tower = enroller.clip_tower()
    n, positions, width = 3, tower.spec.num_positions, tower.hidden_size
    assert art.shapes == {"normed": [n, 512], "clip_embeds": [n, positions, width],
                          "clip_negative": [positions, width]}
    # The official crop: insightface's norm_crop at 224 from the buffalo_l keypoints.
    faces = enroller.analyzer.analyze_many(photos)
    crops = [face_align.norm_crop(p, landmark=f.kps, image_size=224) for p, f in
             zip(photos, faces, strict=True)]
    with torch.inference_mode():
        same_ops = tower.penultimate(clip_preprocess(crops)).numpy()
    np.testing.assert_array_equal(art.tensors["clip_embeds"], same_ops)
    # And transformers' own path: CLIPImageProcessor, the full forward, hidden_states[-2].
    # The processor rounds in float64 where ours rounds in float32 (<= 1e-6 on the
    # pixels, tests/encoders/id/test_clip_vision.py); through three tiny layers that
    # stays far below 1e-4.
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    pixels = torch.from_numpy(CLIPImageProcessorPil()(images=crops,
                                                      return_tensors="np").pixel_values)
    with torch.inference_mode():
        theirs = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    np.testing.assert_allclose(art.tensors["clip_embeds"], theirs.numpy(), rtol=0, atol=1e-4)
    face = family.get_artifact("smiths/ana", "face").artifact
    np.testing.assert_array_equal(art.tensors["normed"], face.tensors["normed"])
    assert np.abs(art.tensors["clip_embeds"][0] - art.tensors["clip_embeds"][1]).max() > 1e-3


def test_negative_is_the_tower_on_zeros_like_the_pixels(enroller, family):
    enroller.enroll("smiths/ana", [synthetic_face(1, 0)], consent=consent(),
                    kinds=["face", "faceid"])
    art = family.get_artifact("smiths/ana", "faceid").artifact
    tower = enroller.clip_tower()
    pixels = clip_preprocess([synthetic_face(1, 0)])
    with torch.inference_mode():
        zeros = tower.model(pixel_values=torch.zeros_like(pixels), output_hidden_states=True)
    # The same tower on the same all-zero input; the full forward and the truncated one
    # run the same layers in the same order.
    np.testing.assert_array_equal(art.tensors["clip_negative"],
                                  zeros.hidden_states[-2][0].numpy())
    # Not a black photo: a zero *preprocessed* input is mid-grey-ish, black is not.
    black = tower.penultimate(clip_preprocess([np.zeros((224, 224, 3), np.uint8)]))[0]
    assert not np.allclose(art.tensors["clip_negative"], black.numpy())


def test_model_ids_name_both_weights(enroller, family, clip_models):
    enroller.enroll("smiths/ana", [synthetic_face(1, 0)], consent=consent(),
                    kinds=["face", "faceid"])
    art = family.get_artifact("smiths/ana", "faceid").artifact
    import hashlib

    sha = hashlib.sha256((clip_models / "clip-vit-h-14" / "model.safetensors").read_bytes())
    assert art.metadata["clip_model_id"] == f"clip-vit-h-14@{sha.hexdigest()[:16]}"
    assert art.metadata["clip_model_id"] == clip_model_id(clip_models / "clip-vit-h-14")
    assert art.metadata["face_model_id"] == enroller.model_id
    assert art.model_id == f"{art.metadata['clip_model_id']}+{enroller.model_id}"


def test_keeps_the_largest_faces_in_enrollment_order(enroller, family):
    radii = [0.22, 0.34, 0.26, 0.38, 0.30, 0.24]  # face sizes of photos 0-5
    photos = [_sized(2, i, r) for i, r in enumerate(radii)]
    names = [f"p{i}.png" for i in range(len(photos))]
    enroller.enroll("smiths/ben", photos, names=names, consent=consent(),
                    kinds=["face", "faceid"])
    art = family.get_artifact("smiths/ben", "faceid").artifact
    assert FACEID_MAX_PHOTOS == 4 and art.shapes["normed"][0] == 4
    assert json.loads(art.metadata["photos"]) == ["p1.png", "p2.png", "p3.png", "p4.png"]
    face = family.get_artifact("smiths/ben", "face").artifact
    np.testing.assert_array_equal(art.tensors["normed"], face.tensors["normed"][[1, 2, 3, 4]])


def test_select_photos_breaks_ties_by_score_then_order():
    class F:
        def __init__(self, px, score):
            self.face_px, self.det_score = px, score

    faces = [F(100, 0.8), F(120, 0.7), F(100, 0.9), F(100, 0.9), F(90, 0.99)]
    assert select_photos(faces, limit=3) == [1, 2, 3]
    assert select_photos(faces, limit=2) == [1, 2]
    with pytest.raises(InvalidInput):
        select_photos([])


def test_a_tower_that_is_not_vit_h14_is_refused(tmp_path):
    from encoders.standins.id_models import write_tiny_clip_vision

    folder = write_tiny_clip_vision(tmp_path / "clip-vit-h-14", spec=TINY_VIT_L)
    with pytest.raises(ModelUnavailable, match="needs OpenCLIP ViT-H/14") as exc:
        FaceIDEncoder(ClipVisionTower.from_pretrained(folder))
    assert "2 layers" in str(exc.value) and str(folder) in str(exc.value)


def test_missing_tower_is_refused_before_any_photo_is_analysed(family, analyzer, tmp_path,
                                                                monkeypatch):
    enroller = Enroller(family, analyzer, tmp_path / "empty")
    monkeypatch.setattr(enroller, "analyze", lambda *a, **k: pytest.fail("analysed"))
    with pytest.raises(ModelUnavailable) as exc:
        enroller.enroll("smiths/ana", [synthetic_face(1, 0)], consent=consent(),
                        kinds=["face", "faceid"])
    message = str(exc.value)
    assert "clip-vit-h-14" in message and str(tmp_path / "empty") in message
    assert family.list_identities() == []


def test_faceid_needs_buffalo_l_embeddings(family, clip_models, tmp_path, monkeypatch):
    from encoders.face.analyzer import FaceAnalyzer
    from encoders.standins.face_pack import write_tiny_face_pack

    pack = write_tiny_face_pack(tmp_path / "models" / "antelopev2", pack="antelopev2")
    enroller = Enroller(family, FaceAnalyzer.from_models_dir(pack, pack="antelopev2"),
                        clip_models)
    monkeypatch.setattr(enroller, "analyze", lambda *a, **k: pytest.fail("analysed"))
    with pytest.raises(InvalidInput, match="faceid needs buffalo_l embeddings"):
        enroller.enroll("smiths/ana", [synthetic_face(1, 0)], consent=consent(),
                        kinds=["face", "faceid"])
