"""The ``instantid`` artifact (InstantID inputs) made at enrollment: antelopev2's raw
embeddings and the reference face's keypoints, with tiny packs of both layouts."""

from __future__ import annotations

import numpy as np
import pytest

from encoders.enrollment import Enroller
from encoders.face.analyzer import FaceAnalyzer
from encoders.id.instantid_inputs import MIN_IOU, InstantIDEncoder, box_iou
from encoders.standins.synthetic_faces import SyntheticFace, synthetic_face, synthetic_photo
from tests.helpers import consent
from vault.errors import ModelUnavailable, PhotoRejected


@pytest.fixture(scope="module")
def antelope_models(tmp_path_factory):
    """A models folder holding the tiny antelopev2 pack in insightface's layout."""
    from encoders.standins.face_pack import write_tiny_face_pack

    root = tmp_path_factory.mktemp("instantid_models")
    write_tiny_face_pack(root / "models" / "antelopev2", pack="antelopev2")
    return root


@pytest.fixture(scope="module")
def antelope(antelope_models):
    return FaceAnalyzer.from_models_dir(antelope_models, pack="antelopev2")


@pytest.fixture
def enroller(family, analyzer, antelope_models):
    return Enroller(family, analyzer, antelope_models)


def test_embeddings_are_antelopev2_raw_ones_not_buffalo_l(enroller, family, antelope):
    photos = [synthetic_face(1, i) for i in range(3)]
    enroller.enroll("smiths/ana", photos, consent=consent(), kinds=["face", "instantid"])
    art = family.get_artifact("smiths/ana", "instantid").artifact  # decoded against the schema
    face = family.get_artifact("smiths/ana", "face").artifact
    assert art.shapes == {"embeddings": [3, 512], "kps": [5, 2], "bbox": [4],
                          "image_size": [2]}
    # The same detector, alignment and one recogniser run over the same crops.
    want = np.stack([r.embedding for r in antelope.analyze_many(photos)])
    np.testing.assert_array_equal(art.tensors["embeddings"], want)
    norms = np.linalg.norm(art.tensors["embeddings"], axis=1)
    assert (norms > 5).all()  # raw, not L2-normalised (the stand-ins' raw norms are ~15)
    # Another network: neither buffalo_l's raw nor its normed rows.
    assert np.abs(art.tensors["embeddings"] - face.tensors["embeddings"]).max() > 1.0
    assert not np.allclose(art.tensors["embeddings"] / norms[:, None], face.tensors["normed"],
                           atol=0.05)
    assert art.model_id.startswith("antelopev2/glintr100.onnx@")
    assert face.model_id.startswith("buffalo_l/w600k_r50.onnx@") and art.model_id != face.model_id


def test_keypoints_box_and_size_are_the_reference_face(enroller, family, antelope):
    # Photo 1's face is the largest; the photos are not square, so width and height differ.
    small = synthetic_photo([SyntheticFace(2, radius=0.18)], 0, (240, 320))
    large = synthetic_photo([SyntheticFace(2, center=(0.6, 0.5), radius=0.3)], 1, (300, 400))
    medium = synthetic_photo([SyntheticFace(2, radius=0.24)], 2, (260, 300))
    enroller.enroll("smiths/ben", [small, large, medium], names=["s", "l", "m"],
                    consent=consent(), kinds=["face", "instantid"])
    art = family.get_artifact("smiths/ben", "instantid").artifact
    assert art.metadata["reference_photo"] == "l"
    ref = antelope.analyze(large)
    np.testing.assert_array_equal(art.tensors["kps"], ref.kps)
    np.testing.assert_array_equal(art.tensors["bbox"], ref.bbox)
    np.testing.assert_array_equal(art.tensors["image_size"], [400, 300])  # width, height
    assert art.tensors["kps"][:, 0].mean() > 200  # the face sits right of the centre


def test_the_picked_person_is_kept_not_the_largest_face(enroller, family, antelope):
    two = synthetic_photo([SyntheticFace(3, center=(0.28, 0.5), radius=0.24),
                           SyntheticFace(5, center=(0.75, 0.5), radius=0.17)], 4, (300, 500))
    enroller.enroll("smiths/cleo", [two], pick=1, consent=consent(),
                    kinds=["face", "instantid"])
    art = family.get_artifact("smiths/cleo", "instantid").artifact
    right = antelope.analyze(two, pick=1)
    left = antelope.analyze(two, pick=0)
    np.testing.assert_array_equal(art.tensors["kps"], right.kps)
    np.testing.assert_array_equal(art.tensors["embeddings"][0], right.embedding)
    assert not np.allclose(art.tensors["embeddings"][0], left.embedding)


def test_a_face_antelopev2_does_not_find_is_refused_by_photo(antelope):
    encoder = InstantIDEncoder(antelope)
    photo = synthetic_face(1, 0)
    real = antelope.analyze(photo)

    class Elsewhere:  # the enrollment's pick, where antelopev2 sees no face
        bbox = np.array([0, 0, 30, 30], np.float32)

    with pytest.raises(PhotoRejected) as exc:
        encoder.faces([photo, photo], [real, Elsewhere()], names=["ok.png", "far.png"])
    assert set(exc.value.details["photos"]) == {"far.png"}
    assert "does not find the enrolled face" in str(exc.value)
    assert box_iou(real.bbox, real.bbox) == pytest.approx(1.0)
    assert box_iou(real.bbox, Elsewhere.bbox) < MIN_IOU


def test_an_antelopev2_enrollment_reuses_its_own_analysis(family, antelope_models, antelope):
    enroller = Enroller(family, antelope, antelope_models)
    photos = [synthetic_face(6, i) for i in range(2)]
    enroller.enroll("smiths/dan", photos, consent=consent(), kinds=["face", "instantid"])
    art = family.get_artifact("smiths/dan", "instantid").artifact
    face = family.get_artifact("smiths/dan", "face").artifact
    assert art.model_id == face.model_id == enroller.model_id
    np.testing.assert_array_equal(art.tensors["embeddings"], face.tensors["embeddings"])


def test_missing_antelopev2_pack_is_refused_before_analysis(family, analyzer, tmp_path,
                                                            monkeypatch):
    enroller = Enroller(family, analyzer, tmp_path / "nothing")
    monkeypatch.setattr(enroller, "analyze", lambda *a, **k: pytest.fail("analysed"))
    with pytest.raises(ModelUnavailable) as exc:
        enroller.enroll("smiths/ana", [synthetic_face(1, 0)], consent=consent(),
                        kinds=["face", "instantid"])
    message = str(exc.value)
    assert "glintr100.onnx" in message and "scrfd_10g_bnkps.onnx" in message
    assert str(tmp_path / "nothing" / "models" / "antelopev2") in message
    assert family.list_identities() == []
