"""Artifact payloads for the adapter tests: ``face`` and ``faceid`` artifacts of random
(seeded) embeddings in the declared schemas, without running any encoder."""

from __future__ import annotations

import numpy as np

from vault import codec

BUFFALO_ID = "buffalo_l/w600k_r50.onnx@0123456789abcdef"
CLIP_ID = "clip-vit-h14-test"
# ViT-H/14 at 224 px has 257 x 1280; tiny here, the width of encoders' TINY_VIT_H
POSITIONS, CLIP_DIM = 17, 32
ANTELOPE_ID = "antelopev2/glintr100.onnx@0123456789abcdef"


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def face_payload(seed: int, photos: int = 3, model_id: str = BUFFALO_ID) -> bytes:
    rng = np.random.default_rng(seed)
    raw = (rng.standard_normal((photos, 512)) * 20).astype(np.float32)  # raw norms ~450
    normed = unit(raw)
    return codec.encode("face", {"embeddings": raw, "normed": normed,
                                 "mean": unit(normed.mean(0))},
                        {"model_id": model_id, "photos": str(photos)})


def faceid_payload(seed: int, photos: int = 2, dtype: str = "float16",
                   model_id: str = "faceid-inputs@test") -> bytes:
    rng = np.random.default_rng(seed)
    return codec.encode("faceid", {
        "normed": unit(rng.standard_normal((photos, 512))).astype(dtype),
        "clip_embeds": rng.standard_normal((photos, POSITIONS, CLIP_DIM)).astype(dtype),
        "clip_negative": rng.standard_normal((POSITIONS, CLIP_DIM)).astype(dtype),
    }, {"model_id": model_id, "face_model_id": BUFFALO_ID,
        "clip_model_id": CLIP_ID})


def instantid_payload(seed: int, photos: int = 2, model_id: str = ANTELOPE_ID) -> bytes:
    rng = np.random.default_rng(seed)
    kps = np.array([[150, 180], [250, 180], [200, 240], [160, 300], [240, 300]], np.float32)
    return codec.encode("instantid", {
        "embeddings": (rng.standard_normal((photos, 512)) * 20).astype(np.float32),
        "kps": kps + rng.uniform(-5, 5, kps.shape).astype(np.float32),
        "bbox": np.array([100, 110, 300, 360], np.float32),
        "image_size": np.array([400, 500], np.float32)}, {"model_id": model_id})
