"""encoders.face.models: the sessions' onnxruntime options, and what a pack load opens."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from encoders.face.analyzer import AnalyzerConfig, FaceAnalyzer
from encoders.face.models import FaceModels, session_options
from encoders.face.pack import find_face_pack
from encoders.standins.face_pack import synthetic_face
from vault.errors import InvalidInput

SPINNING = "session.intra_op.allow_spinning"


def _sessions(models: FaceModels) -> list[ort.InferenceSession]:
    """Every session the models run: the recogniser's, the detector's and the
    fixed-shape one SCRFD builds per input size (the one detect() runs)."""
    detector = models.detector
    sized = list(detector.resolution_sessions.values())
    assert sized, "the warm-up built the detector's fixed-shape session"
    return [models.recognizer.session, detector.session, *sized]


def test_every_session_runs_with_the_product_options(analyzer: FaceAnalyzer) -> None:
    for session in _sessions(analyzer.models):
        options = session.get_session_options()
        assert options.get_session_config_entry(SPINNING) == "0"
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        assert options.intra_op_num_threads == 0  # onnxruntime: one per physical core
        assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_threads_setting_reaches_every_session(analyzer: FaceAnalyzer) -> None:
    one = FaceAnalyzer(analyzer.models.pack, config=AnalyzerConfig(threads=1))
    assert one.models is not analyzer.models and one.models.threads == 1
    assert FaceAnalyzer(analyzer.models.pack, config=AnalyzerConfig(threads=1)).models \
        is one.models
    for session in _sessions(one.models):
        assert session.get_session_options().intra_op_num_threads == 1
        assert session.get_session_options().get_session_config_entry(SPINNING) == "0"
    photo = synthetic_face(3, 3)
    # One thread or several only split the same sums differently: float32
    # rounding (~1e-7 relative per add), far below a tenth of a percent.
    np.testing.assert_allclose(one.analyze(photo).normed, analyzer.analyze(photo).normed,
                               rtol=1e-4, atol=1e-5)


def test_threads_must_be_positive(analyzer: FaceAnalyzer) -> None:
    with pytest.raises(InvalidInput, match="threads must be at least 1"):
        FaceAnalyzer(analyzer.models.pack, config=AnalyzerConfig(threads=0))
    with pytest.raises(InvalidInput):
        session_options(-2)
    assert session_options(3).intra_op_num_threads == 3


def test_only_the_detector_and_recogniser_are_opened(tmp_path: Path,
                                                     tiny_pack_dir: Path) -> None:
    # buffalo_l also ships landmark and gender/age models; enrollment needs
    # neither. Unreadable stand-ins for them prove they are never loaded.
    pack_dir = tmp_path / "buffalo_l"
    shutil.copytree(tiny_pack_dir, pack_dir)
    for name in ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx"):
        (pack_dir / name).write_bytes(b"\x08not a model")
    analyzer = FaceAnalyzer(find_face_pack(pack_dir), config=AnalyzerConfig(threads=2))
    result = analyzer.analyze(synthetic_face(5, 5))
    assert result.embedding.shape == (analyzer.embedding_dim,)
    assert {Path(analyzer.models.detector.model_file).name,
            Path(analyzer.models.recognizer.model_file).name} == {"det_10g.onnx",
                                                                  "w600k_r50.onnx"}
