"""encoders.face.analyzer on the tiny stand-in pack: detection, quality, alignment, embedding."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from encoders.face.analyzer import AnalyzerConfig, FaceAnalyzer, FaceQuality
from encoders.face.models import choose_providers
from encoders.face.pack import find_face_pack
from encoders.standins.face_pack import (
    SyntheticFace,
    TinyRecognizerConfig,
    build_tiny_detector,
    build_tiny_recognizer,
    synthetic_face,
    synthetic_photo,
)
from encoders.standins.synthetic_faces import ARCFACE_DST, DOT_COLOURS, KP_TEMPLATE
from vault.errors import InvalidInput, ModelUnavailable, PhotoRejected

# insightface's norm_crop calls a deprecated scikit-image API; the analyzer
# silences it in production, pytest re-enables warnings per test.

TWO_PEOPLE = [SyntheticFace(11, center=(0.25, 0.5), radius=0.2),
              SyntheticFace(12, center=(0.75, 0.5), radius=0.28)]


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def test_one_face_is_found_aligned_and_embedded(analyzer: FaceAnalyzer) -> None:
    result = analyzer.analyze(synthetic_face(1, 0, jitter=False))
    # Drawn at the centre of 256 px with radius 0.28 * 256 = 71.7 px.
    np.testing.assert_allclose(result.bbox, [56.3, 56.3, 199.7, 199.7], atol=2.0)
    np.testing.assert_allclose(result.kps, 128 + 71.68 * KP_TEMPLATE, atol=1.5)
    assert result.det_score > 0.9 and result.face_px > 140 and result.blur > 100
    assert result.embedding.shape == (512,) and result.embedding.dtype == np.float32
    assert result.normed.shape == (512,) and result.normed.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(result.normed), 1.0, rtol=1e-5)
    np.testing.assert_allclose(result.normed, result.embedding / np.linalg.norm(result.embedding),
                               rtol=1e-5, atol=1e-7)
    assert result.aligned.shape == (112, 112, 3) and result.aligned.dtype == np.uint8
    assert (result.face_index, result.faces_found) == (0, 1)
    assert analyzer.embedding_dim == 512


def test_alignment_puts_each_keypoint_on_the_arcface_template(analyzer: FaceAnalyzer) -> None:
    # A rotated, shifted, scaled face: norm_crop must undo all of it, so the
    # coloured keypoint dots land on ArcFace's five template points, in order.
    crop = analyzer.analyze(synthetic_face(3, 17)).aligned
    for (x, y), colour in zip(ARCFACE_DST, DOT_COLOURS):
        pixel = crop[int(round(y)), int(round(x))].astype(int)
        assert np.abs(pixel - np.array(colour)).max() < 90, (colour, pixel)


def test_no_face(analyzer: FaceAnalyzer) -> None:
    with pytest.raises(PhotoRejected, match="^landscape: no face found$"):
        analyzer.analyze(synthetic_photo([], 3), name="landscape")


def test_two_faces_need_a_pick(analyzer: FaceAnalyzer) -> None:
    photo = synthetic_photo(TWO_PEOPLE, 5, size=(256, 512))
    with pytest.raises(PhotoRejected) as err:
        analyzer.analyze(photo, name="group.jpg")
    message = str(err.value)
    assert message.startswith("group.jpg: found 2 faces and 2 are usable")
    assert "'largest'" in message and "--pick" in message and err.value.details["faces"] == 2
    largest = analyzer.analyze(photo, pick="largest")
    assert largest.face_index == 1 and largest.faces_found == 2  # the right-hand, bigger face
    left = analyzer.analyze(photo, pick=0)
    assert left.bbox[2] < 256 < largest.bbox[0]
    # Each pick embeds its own person.
    alone = analyzer.analyze(synthetic_face(11, 99, radius=0.4))
    assert float(left.normed @ alone.normed) > 0.8
    assert abs(float(largest.normed @ alone.normed)) < 0.5
    with pytest.raises(PhotoRejected, match="no face 2; found 2 faces"):
        analyzer.analyze(photo, pick=2)
    with pytest.raises(InvalidInput):
        analyzer.analyze(photo, pick="smallest")  # type: ignore[arg-type]


def test_one_usable_face_beside_an_unusable_one_is_accepted(analyzer: FaceAnalyzer) -> None:
    photo = synthetic_photo([SyntheticFace(21, center=(0.3, 0.5), radius=0.25),
                             SyntheticFace(22, center=(0.85, 0.2), radius=0.05)], 8,
                            size=(256, 512))
    result = analyzer.analyze(photo)
    assert result.faces_found == 2 and result.face_px > 100


def test_tiny_face_is_rejected(analyzer: FaceAnalyzer) -> None:
    with pytest.raises(PhotoRejected) as err:
        analyzer.analyze(synthetic_face(4, 1, radius=0.06), name="far.jpg")
    assert "far.jpg: found 1 face, none usable: face 0 at" in str(err.value)
    assert "face too small" in str(err.value) and "minimum 64 px" in str(err.value)
    # Picking it does not make it usable.
    with pytest.raises(PhotoRejected, match="the picked face 0 .*face too small"):
        analyzer.analyze(synthetic_face(4, 1, radius=0.06), pick=0)


def test_blurred_face_is_rejected(analyzer: FaceAnalyzer) -> None:
    sharp = analyzer.detect(synthetic_face(5, 2))[0]
    blurred = analyzer.detect(synthetic_face(5, 2, blur_sigma=3.0))
    assert len(blurred) == 1 and sharp.usable
    assert blurred[0].blur < sharp.blur / 5
    with pytest.raises(PhotoRejected, match=r"too blurry \(sharpness [0-9.]+, minimum 25.0\)"):
        analyzer.analyze(synthetic_face(5, 2, blur_sigma=3.0))


def test_low_detector_score_is_rejected(analyzer: FaceAnalyzer) -> None:
    # A faint ring: the stand-in detector is less sure (score ~0.55).
    faint = synthetic_face(6, 0, marker_strength=0.47, jitter=False)
    (candidate,) = analyzer.detect(faint)
    assert 0.5 <= candidate.det_score < 0.6
    with pytest.raises(PhotoRejected, match=r"detector score 0\.5[0-9] is below 0\.60"):
        analyzer.analyze(faint)
    # Thresholds are configuration: a stricter bar rejects the clear face too.
    strict = FaceAnalyzer(analyzer.models.pack, FaceQuality(min_det_score=0.999))
    with pytest.raises(PhotoRejected, match="is below 1.00"):
        strict.analyze(synthetic_face(6, 0))
    with pytest.raises(InvalidInput):
        FaceQuality(detect_threshold=0.7, min_det_score=0.6)


def test_same_person_close_different_people_apart(analyzer: FaceAnalyzer) -> None:
    people = range(100, 110)
    first = analyzer.analyze_many([synthetic_face(p, 2 * p) for p in people])
    second = analyzer.analyze_many([synthetic_face(p, 2 * p + 1) for p in people])
    a = np.stack([r.normed for r in first])  # (10, 512)
    b = np.stack([r.normed for r in second])
    same = np.sum(a * b, axis=1)
    assert same.min() > 0.8 and same.mean() > 0.9
    cross = (a @ a.T)[np.triu_indices(len(a), k=1)]
    assert np.abs(cross).mean() < 0.2 and np.quantile(np.abs(cross), 0.9) < 0.3


def test_batching_matches_one_by_one_in_one_recogniser_run(analyzer: FaceAnalyzer,
                                                          monkeypatch) -> None:
    photos = [synthetic_face(p, p + 40) for p in range(6)]
    singles = [analyzer.analyze(p).embedding for p in photos]
    recognizer = analyzer.models.recognizer
    calls: list[int] = []
    original = recognizer.get_feat

    def spy(crops):
        calls.append(len(crops))
        return original(crops)

    monkeypatch.setattr(recognizer, "get_feat", spy)
    batch = analyzer.analyze_many(photos)
    assert calls == [6]
    for got, want in zip(batch, singles):
        np.testing.assert_allclose(got.embedding, want, rtol=1e-5, atol=1e-5)
    calls.clear()
    small_batches = FaceAnalyzer(analyzer.models.pack, config=AnalyzerConfig(embed_batch=4))
    small_batches.analyze_many(photos)
    assert calls == [4, 2]


def test_many_photos_report_every_rejection(analyzer: FaceAnalyzer) -> None:
    photos = [synthetic_face(1, 1), synthetic_photo([], 2), b"not an image",
              synthetic_face(2, 3, blur_sigma=3)]
    with pytest.raises(PhotoRejected) as err:
        analyzer.analyze_many(photos, names=["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    message = str(err.value)
    assert message.startswith("3 of 4 photos rejected")
    assert "b.jpg: no face found" in message and "c.jpg: not a readable image" in message
    assert "d.jpg: found 1 face, none usable" in message and "a.jpg" not in message
    assert set(err.value.details["photos"]) == {"b.jpg", "c.jpg", "d.jpg"}


def test_accepts_encoded_photos_and_paths(analyzer: FaceAnalyzer, tmp_path: Path) -> None:
    image = synthetic_face(7, 7)
    direct = analyzer.analyze(image)
    from_bytes = analyzer.analyze(_png(image))
    np.testing.assert_allclose(from_bytes.embedding, direct.embedding, rtol=1e-5, atol=1e-5)
    path = tmp_path / "me.jpg"
    Image.fromarray(image).save(path, "JPEG", quality=92)
    assert float(analyzer.analyze(path).normed @ direct.normed) > 0.95
    empty = tmp_path / "wall.png"
    empty.write_bytes(_png(synthetic_photo([], 1)))
    with pytest.raises(PhotoRejected, match="^wall.png: no face found"):
        analyzer.analyze(empty)
    with pytest.raises(InvalidInput):
        analyzer.analyze(np.zeros((10, 10), np.uint8))


def test_models_load_once_per_process(analyzer: FaceAnalyzer) -> None:
    again = FaceAnalyzer(analyzer.models.pack, FaceQuality(min_blur=1.0))
    assert again.models is analyzer.models
    other_size = FaceAnalyzer(analyzer.models.pack, config=AnalyzerConfig(det_size=(320, 320)))
    assert other_size.models is not analyzer.models
    assert other_size.analyze(synthetic_face(1, 0)).face_px > 100


def test_provider_choice() -> None:
    cpu = ["CPUExecutionProvider"]
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(cpu, has_gpu=True) == cpu
    assert choose_providers(both, has_gpu=False) == cpu
    assert choose_providers(both, has_gpu=True) == both
    assert "CPUExecutionProvider" in choose_providers()


def test_embedding_dim_is_read_from_the_model(tmp_path: Path) -> None:
    onnx.save(build_tiny_detector(), str(tmp_path / "det_10g.onnx"))
    onnx.save(build_tiny_recognizer(TinyRecognizerConfig(embedding_dim=128)),
              str(tmp_path / "w600k_r50.onnx"))
    small = FaceAnalyzer(find_face_pack(tmp_path))
    assert small.embedding_dim == 128
    assert small.analyze(synthetic_face(1, 1)).embedding.shape == (128,)


def test_unloadable_or_misplaced_models_raise_model_unavailable(tmp_path: Path,
                                                               tiny_pack_dir: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "det_10g.onnx").write_bytes((tiny_pack_dir / "det_10g.onnx").read_bytes()[:500])
    (broken / "w600k_r50.onnx").write_bytes((tiny_pack_dir / "w600k_r50.onnx").read_bytes())
    with pytest.raises(ModelUnavailable) as err:
        FaceAnalyzer(find_face_pack(broken))
    assert "det_10g.onnx is not a usable face detector" in str(err.value)
    assert "cannot be loaded" in str(err.value) and "non-commercial" in str(err.value)

    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "det_10g.onnx").write_bytes((tiny_pack_dir / "w600k_r50.onnx").read_bytes())
    (swapped / "w600k_r50.onnx").write_bytes((tiny_pack_dir / "det_10g.onnx").read_bytes())
    with pytest.raises(ModelUnavailable, match="not an SCRFD face detector with keypoints"):
        FaceAnalyzer(find_face_pack(swapped))


@pytest.mark.parametrize("per_call", [True, False])
def test_detection_threshold_drops_weak_candidates(analyzer: FaceAnalyzer, monkeypatch,
                                                   per_call: bool) -> None:
    import dataclasses

    faint = synthetic_face(6, 0, marker_strength=0.47, jitter=False)  # scores ~0.55
    picky = FaceAnalyzer(analyzer.models.pack,
                         FaceQuality(detect_threshold=0.58, min_det_score=0.6))
    # per_call=False is the insightface < 2 path: threshold applied after detect().
    monkeypatch.setattr(picky, "models",
                        dataclasses.replace(picky.models, per_call_threshold=per_call))
    assert picky.detect(faint) == []
    assert len(picky.detect(synthetic_face(6, 0, jitter=False))) == 1
