"""encoders.standins.arcface_r50: a full-size ArcFace R50 through the user's loading path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from encoders.face.analyzer import FaceAnalyzer
from encoders.face.pack import find_face_pack
from encoders.standins.arcface_r50 import IBasicBlock, iresnet50, parameter_count
from encoders.standins.face_pack import synthetic_face


def test_iresnet50_has_insightfaces_architecture() -> None:
    model = iresnet50().eval()
    assert 43_500_000 < parameter_count(model) < 43_700_000  # insightface: 43.6M
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(s) for s in stages] == [3, 4, 14, 3]
    assert all(isinstance(b, IBasicBlock) for s in stages for b in s)
    assert [s[0].conv2.stride for s in stages] == [(2, 2)] * 4
    assert model.fc.in_features == 512 * 7 * 7 and model.fc.out_features == 512
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512) and torch.isfinite(out).all()


@pytest.mark.slow
def test_full_size_recogniser_runs_through_the_analyzer(r50_pack_dir: Path) -> None:
    rec_path = r50_pack_dir / "w600k_r50.onnx"
    graph = onnx.load(str(rec_path), load_external_data=False)
    assert [i.name for i in graph.graph.input] == ["input.1"]
    assert [o.name for o in graph.graph.output] == ["683"]
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["None", 3, 112, 112]
    assert rec_path.stat().st_size > 170_000_000  # 43.6M float32 parameters

    # The export computes what the PyTorch model computes.
    torch.manual_seed(0)
    reference = iresnet50().eval()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(rec_path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input.1": x})[0], want, rtol=1e-3, atol=1e-4)

    analyzer = FaceAnalyzer(find_face_pack(r50_pack_dir))
    assert analyzer.embedding_dim == 512
    photos = [synthetic_face(p, p) for p in range(3)]
    batch = analyzer.analyze_many(photos)
    single = analyzer.analyze(photos[1])
    assert all(r.embedding.shape == (512,) and np.isfinite(r.embedding).all() for r in batch)
    # One recogniser run for the three crops vs one for the crop alone: onnxruntime
    # may block the convolutions differently by batch size and so add in
    # another order. float32 rounding (2^-24 per add) over dot products of up
    # to 4,608 terms through 50 layers stays far below 1e-4 relative
    # (onnxruntime 1.32 on CPU gave identical results); a wrong crop, order
    # or normalisation would be off by far more.
    np.testing.assert_allclose(batch[1].embedding, single.embedding, rtol=1e-4, atol=1e-5)
    assert float(batch[1].normed @ single.normed) > 1 - 1e-6
    np.testing.assert_allclose(np.linalg.norm(batch[0].normed), 1.0, rtol=1e-5)
