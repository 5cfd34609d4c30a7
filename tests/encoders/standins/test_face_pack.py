"""encoders.standins.face_pack: the stand-in pack keeps the real files' interface."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from insightface.model_zoo import get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.scrfd import SCRFD
from insightface.utils import face_align

from encoders.standins.face_pack import (
    DETECTOR_OUTPUTS,
    SyntheticFace,
    synthetic_face,
    synthetic_photo,
    write_tiny_face_pack,
)
from encoders.standins.synthetic_faces import ARCFACE_DST, KP_TEMPLATE


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_files_have_the_real_names_shapes_and_classification(tiny_pack_dir: Path) -> None:
    det = onnx.load(str(tiny_pack_dir / "det_10g.onnx"))
    assert [i.name for i in det.graph.input] == ["input.1"]
    assert _dims(det.graph.input[0]) == [1, 3, "?", "?"]
    assert [o.name for o in det.graph.output] == list(DETECTOR_OUTPUTS)
    assert [_dims(o)[-1] for o in det.graph.output] == [1, 1, 1, 4, 4, 4, 10, 10, 10]
    rec = onnx.load(str(tiny_pack_dir / "w600k_r50.onnx"))
    assert [i.name for i in rec.graph.input] == ["input.1"]
    assert _dims(rec.graph.input[0]) == ["None", 3, 112, 112]
    assert [(o.name, _dims(o)) for o in rec.graph.output] == [("683", ["None", 512])]

    detector = get_model(str(tiny_pack_dir / "det_10g.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(detector, SCRFD)
    assert (detector.use_kps, detector.fmc, detector._num_anchors) == (True, 3, 2)
    assert detector._feat_stride_fpn == [8, 16, 32] and not detector.batched
    assert detector.static_input_size is None  # dynamic H and W, like det_10g
    recognizer = get_model(str(tiny_pack_dir / "w600k_r50.onnx"),
                           providers=["CPUExecutionProvider"])
    assert isinstance(recognizer, ArcFaceONNX)
    # (px - 127.5) / 127.5 as for the PyTorch-exported w600k_r50, not MXNet's built-in.
    assert (recognizer.input_mean, recognizer.input_std) == (127.5, 127.5)
    assert recognizer.input_size == (112, 112)


def test_template_matches_insightface() -> None:
    np.testing.assert_array_equal(ARCFACE_DST, face_align.arcface_dst)


def test_output_rows_are_row_major_with_anchors_innermost(tiny_pack_dir: Path) -> None:
    # One face centred at (192, 384) in a 640x640 input, radius 134.4 px: too
    # big for the stride-16 windows (128 px), so only stride 32 reports it, at
    # anchor (x=6, y=12).
    image = synthetic_face(1, 0, size=640, center=(0.3, 0.6), radius=0.21, jitter=False)
    blob = ((image.astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
    session = ort.InferenceSession(str(tiny_pack_dir / "det_10g.onnx"),
                                   providers=["CPUExecutionProvider"])
    out = dict(zip(DETECTOR_OUTPUTS, session.run(None, {"input.1": blob})))
    scores = [out[n] for n in DETECTOR_OUTPUTS[:3]]
    assert [s.shape for s in scores] == [(12800, 1), (3200, 1), (800, 1)]
    assert [out[n].shape for n in DETECTOR_OUTPUTS[3:]] == [(12800, 4), (3200, 4), (800, 4),
                                                            (12800, 10), (3200, 10), (800, 10)]
    assert scores[0].max() < 0.5 and scores[1].max() < 0.5
    row = (12 * 20 + 6) * 2
    assert set(np.flatnonzero(scores[2][:, 0] > 0.5)) == {row, row + 1}
    anchor = np.array([6 * 32, 12 * 32], np.float32)
    l, t, r, b = out["497"][row] * 32  # stride-32 boxes: distances in stride units
    np.testing.assert_allclose([anchor[0] - l, anchor[1] - t, anchor[0] + r, anchor[1] + b],
                               [57.6, 249.6, 326.4, 518.4], atol=1.5)
    kps = anchor + out["500"][row].reshape(5, 2) * 32
    np.testing.assert_allclose(kps, np.array([192, 384]) + 134.4 * KP_TEMPLATE, atol=1.0)


def test_non_square_inputs_give_grid_sized_outputs(tiny_pack_dir: Path) -> None:
    session = ort.InferenceSession(str(tiny_pack_dir / "det_10g.onnx"),
                                   providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input.1": np.zeros((1, 3, 480, 640), np.float32)})
    rows = [60 * 80 * 2, 30 * 40 * 2, 15 * 20 * 2]
    assert [o.shape for o in outputs] == [(n, w) for w in (1, 4, 10) for n in rows]
    assert all(np.isfinite(o).all() for o in outputs) and outputs[0].max() == 0.0


def test_pack_and_photos_are_deterministic(tmp_path: Path) -> None:
    a, b = write_tiny_face_pack(tmp_path / "a"), write_tiny_face_pack(tmp_path / "b")
    for name in ("det_10g.onnx", "w600k_r50.onnx"):
        assert (hashlib.sha256((a / name).read_bytes()).digest()
                == hashlib.sha256((b / name).read_bytes()).digest())
    np.testing.assert_array_equal(synthetic_face(3, 4), synthetic_face(3, 4))
    assert not np.array_equal(synthetic_face(3, 4), synthetic_face(3, 5))
    photo = synthetic_photo([SyntheticFace(1), SyntheticFace(2, center=(0.8, 0.8))], 1,
                            size=(120, 200))
    assert photo.shape == (120, 200, 3) and photo.dtype == np.uint8


def test_unknown_pack_name_is_refused(tmp_path: Path) -> None:
    from vault.errors import InvalidInput

    with pytest.raises(InvalidInput):
        write_tiny_face_pack(tmp_path, pack="buffalo_xl")
    antelope = write_tiny_face_pack(tmp_path / "antelopev2", pack="antelopev2")
    assert sorted(p.name for p in antelope.iterdir()) == ["glintr100.onnx",
                                                          "scrfd_10g_bnkps.onnx"]
