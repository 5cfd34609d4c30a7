"""Loading insightface face models once per process, on the right execution provider.

The detector (SCRFD) and recogniser (ArcFace) of a pack are loaded with
insightface's ``model_zoo.get_model`` so they are classified and pre- and
post-processed exactly as insightface does it. Loading ArcFace R50 takes
seconds and ~170 MB, and SCRFD builds a fixed-shape session for each input
size on first use, so models are cached process-wide (by file, providers,
threads and detector settings) and warmed up as they load.

Every session runs with :func:`session_options`: onnxruntime's defaults except
that idle pool threads sleep instead of spinning (bench/README.md has the
measurements behind each choice).
"""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
from insightface.model_zoo import get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.scrfd import SCRFD

from encoders.face.pack import FacePack, obtain_instructions
from vault.errors import InvalidInput, ModelUnavailable


def gpu_present() -> bool:
    """Is an NVIDIA GPU visible to this process (without importing torch)?"""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    return Path("/dev/nvidia0").exists()


def choose_providers(available: Sequence[str] | None = None,
                     has_gpu: bool | None = None) -> list[str]:
    """CUDA (with CPU fallback) when onnxruntime has it and a GPU is present, else CPU."""
    available = onnxruntime.get_available_providers() if available is None else available
    if "CUDAExecutionProvider" in available and (gpu_present() if has_gpu is None else has_gpu):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(threads: int | None = None) -> onnxruntime.SessionOptions:
    """The options of every face model session; ``threads`` None: one per physical core.

    Measured on the enrollment sequence (bench_face.py, "session options"):
    only spinning mattered. A session's idle pool threads spin by default,
    waiting for the next run, so the detector's threads burned the cores the
    recogniser needed right after it (and the recogniser's, those of the
    store, faiss and a web server): detect + embed ran 1.7-1.8x slower with
    spinning on 2 cores. Full graph optimisation (the default) beats
    EXTENDED by 25-35% (it adds the NCHWc layout on x86); the arena and
    memory patterns are neutral; parallel execution mode loses. Those stay
    onnxruntime's defaults, set here so that they are stated.
    """
    if threads is not None and threads < 1:
        raise InvalidInput("threads must be at least 1 (or None: one per physical core)")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or 0  # 0: onnxruntime picks the physical cores
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


@dataclass(frozen=True, eq=False)
class FaceModels:
    """Loaded, warmed-up detector and recogniser, shared process-wide."""

    pack: FacePack
    detector: SCRFD
    recognizer: ArcFaceONNX
    embedding_dim: int
    providers: tuple[str, ...]  # as activated by onnxruntime
    det_size: tuple[int, int]
    threads: int | None  # onnxruntime intra-op threads per session; None: physical cores
    batch_fixed: bool  # the recogniser only accepts batches of one
    per_call_threshold: bool  # SCRFD.detect takes det_thresh (insightface >= 2)


_CACHE: dict[tuple, FaceModels] = {}
_CACHE_LOCK = threading.Lock()


def load_face_models(pack: FacePack, providers: Sequence[str] | None = None,
                     det_size: tuple[int, int] = (640, 640),
                     nms_threshold: float = 0.4, threads: int | None = None) -> FaceModels:
    """Load (once per process) and warm up the pack's detector and recogniser."""
    providers = tuple(providers or choose_providers())
    key = (_file_key(pack.detector_path), _file_key(pack.recognizer_path), providers,
           tuple(det_size), nms_threshold, threads)
    with _CACHE_LOCK:
        models = _CACHE.get(key)
        if models is None:
            models = _load(pack, providers, tuple(det_size), nms_threshold, threads)
            _CACHE[key] = models
        return models


def clear_model_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def _file_key(path: Path) -> tuple[str, int, int]:
    # A pack replaced in place (same path, new file) must load afresh.
    try:
        st = path.stat()
    except OSError:
        return (str(path), -1, -1)
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _load(pack: FacePack, providers: tuple[str, ...], det_size: tuple[int, int],
          nms: float, threads: int | None) -> FaceModels:
    # Only the two files enrollment needs are opened: buffalo_l's landmark and
    # gender/age models (insightface's FaceAnalysis loads them all and runs
    # them on every face) would cost memory (1k3d68.onnx alone is ~144 MB),
    # load time and runs per face for nothing enrollment uses.
    options = session_options(threads)
    detector = _get(pack, pack.detector_path, "detector", providers, options)
    if not isinstance(detector, SCRFD) or not detector.use_kps:
        raise _unusable(pack, pack.detector_path, "detector",
                        f"it is not an SCRFD face detector with keypoints "
                        f"(insightface classified it as {type(detector).__name__})")
    recognizer = _get(pack, pack.recognizer_path, "recogniser", providers, options)
    if not isinstance(recognizer, ArcFaceONNX):
        raise _unusable(pack, pack.recognizer_path, "recogniser",
                        f"it is not an ArcFace-style recogniser "
                        f"(insightface classified it as {type(recognizer).__name__})")
    if tuple(recognizer.input_size) != (112, 112):
        raise _unusable(pack, pack.recognizer_path, "recogniser",
                        f"it expects {recognizer.input_size} crops, not 112x112")
    detector.prepare(0, input_size=det_size, nms_thresh=nms)
    try:
        # Warm-up: SCRFD builds a fixed-shape session for this input size on
        # first use (~1.5 s for det_10g); do it now, not on a user's photo.
        detector.detect(np.zeros((det_size[1], det_size[0], 3), np.uint8), input_size=det_size)
    except Exception as exc:
        raise _unusable(pack, pack.detector_path, "detector", f"a test run failed: {exc}") from exc
    try:
        probe = recognizer.get_feat([np.zeros((112, 112, 3), np.uint8)])  # (1, D)
    except Exception as exc:
        raise _unusable(pack, pack.recognizer_path, "recogniser",
                        f"a test run failed: {exc}") from exc
    probe = np.asarray(probe)
    if probe.ndim != 2 or probe.shape[0] != 1 or probe.shape[1] < 1:
        raise _unusable(pack, pack.recognizer_path, "recogniser",
                        f"it returned shape {probe.shape}, expected (1, D)")
    batch_dim = recognizer.input_shape[0]
    return FaceModels(
        pack=pack, detector=detector, recognizer=recognizer,
        embedding_dim=int(probe.shape[1]),
        providers=tuple(detector.session.get_providers()),
        det_size=det_size,
        threads=threads,
        batch_fixed=isinstance(batch_dim, int) and batch_dim == 1,
        per_call_threshold="det_thresh" in inspect.signature(detector.detect).parameters,
    )


def _get(pack: FacePack, path: Path, role: str, providers: tuple[str, ...],
         options: onnxruntime.SessionOptions):
    try:
        # SCRFD copies these options into the fixed-shape session it builds per size.
        return get_model(str(path), providers=list(providers), sess_options=options)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _unusable(pack, path, role, f"it cannot be loaded ({reason[:300]})") from exc


def _unusable(pack: FacePack, path: Path, role: str, why: str) -> ModelUnavailable:
    return ModelUnavailable(
        f"{path} is not a usable face {role} for pack {pack.spec.name!r}: {why}. "
        f"The file may be truncated or from another pack; replace it with the original.\n"
        + obtain_instructions(pack.spec),
        path=str(path),
        pack=pack.spec.name,
    )
