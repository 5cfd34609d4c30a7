"""encoders.standins.scrfd_10g: a full-size SCRFD-10G through the user's loading path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from encoders.face.analyzer import FaceAnalyzer
from encoders.face.pack import find_face_pack
from encoders.standins.face_pack import DETECTOR_OUTPUTS, synthetic_face
from encoders.standins.scrfd_10g import SCRFD10G, conv_macs, export_random_scrfd_10g


def test_scrfd_10g_has_the_published_size(one_torch_thread) -> None:
    model = SCRFD10G().eval()
    # The SCRFD paper's "10GF" counts multiply-adds at VGA, 640x480.
    assert 9.9e9 < conv_macs(model, 480, 640) < 10.1e9
    assert 4.1e6 < sum(p.numel() for p in model.parameters()) < 4.4e6  # det_10g.onnx: ~16.9 MB
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 96, 128))
    cells = [(96 // s) * (128 // s) * 2 for s in (8, 16, 32)]
    assert [tuple(o.shape) for o in outs] == ([(n, 1) for n in cells] + [(n, 4) for n in cells]
                                              + [(n, 10) for n in cells])
    assert float(max(o.max() for o in outs[:3])) < 1e-6  # scores: no face anywhere


@pytest.mark.slow
def test_full_size_detector_loads_as_insightface_scrfd(tmp_path: Path,
                                                       tiny_pack_dir: Path) -> None:
    path = export_random_scrfd_10g(tmp_path / "det_10g.onnx")
    graph = onnx.load(str(path), load_external_data=False)
    assert [o.name for o in graph.graph.output] == list(DETECTOR_OUTPUTS)
    assert 16_000_000 < path.stat().st_size < 18_000_000

    # The export computes what the PyTorch model computes.
    torch.manual_seed(0)
    reference = SCRFD10G().eval()
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 320, 256)).astype(np.float32)
    with torch.no_grad():
        want = [t.numpy() for t in reference(torch.from_numpy(x))]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for got, expected in zip(session.run(None, {"input.1": x}), want):
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)

    shutil.copy(tiny_pack_dir / "w600k_r50.onnx", tmp_path / "w600k_r50.onnx")
    analyzer = FaceAnalyzer(find_face_pack(tmp_path))
    detector = analyzer.models.detector
    assert detector.use_kps and detector.fmc == 3 and detector._num_anchors == 2
    boxes, kps = analyzer.locate(synthetic_face(1, 1, size=(480, 640)))
    assert boxes.shape == (0, 5) and kps.shape == (0, 5, 2)
