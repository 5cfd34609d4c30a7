"""Fixtures for the encoder tests: stand-in face packs built once per session.

The tiny pack (``encoders.standins.face_pack``) takes well under a second to write;
the full-size ArcFace R50 export takes ~10-30 s, so it is built only when a
``slow`` test asks for it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from encoders.face.pack import find_face_pack


@pytest.fixture(scope="session")
def tiny_pack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from encoders.standins.face_pack import write_tiny_face_pack

    return write_tiny_face_pack(tmp_path_factory.mktemp("tiny_pack") / "models" / "buffalo_l")


@pytest.fixture(scope="session")
def analyzer(tiny_pack_dir: Path):
    from encoders.face.analyzer import FaceAnalyzer

    return FaceAnalyzer(find_face_pack(tiny_pack_dir))


@pytest.fixture(scope="session")
def r50_pack_dir(tmp_path_factory: pytest.TempPathFactory, tiny_pack_dir: Path) -> Path:
    """A buffalo_l-layout pack: the tiny detector plus a random full-size ArcFace R50."""
    from encoders.standins.arcface_r50 import export_random_arcface_r50

    directory = tmp_path_factory.mktemp("r50_pack")
    shutil.copy(tiny_pack_dir / "det_10g.onnx", directory / "det_10g.onnx")
    export_random_arcface_r50(directory / "w600k_r50.onnx")
    return directory


@pytest.fixture
def one_torch_thread():
    """Tiny fits on one torch thread: under pytest (its plugins load other OpenMP/BLAS users)
    two threads on a shared 2-core machine ran these tiny models ~50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny diffusers SD1.5 pipeline folder (generators.standins.pipelines)."""
    from generators.standins.pipelines import write_tiny_sd15

    return write_tiny_sd15(tmp_path_factory.mktemp("tiny_sd15") / "sd15")
