"""Artifact payloads for the adapter tests: ``face`` and ``faceid`` artifacts of random
(seeded) embeddings in the declared schemas, without running any encoder."""

from __future__ import annotations

import numpy as np

from vault import codec

BUFFALO_ID = "buffalo_l/w600k_r50.onnx@0123456789abcdef"
CLIP_ID = "clip-vit-h14-test"
POSITIONS, CLIP_DIM = 17, 48  # ViT-H/14 at 224 px has 257 x 1280; tiny here


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def face_payload(seed: int, photos: int = 3, model_id: str = BUFFALO_ID) -> bytes:
    rng = np.random.default_rng(seed)
    raw = (rng.standard_normal((photos, 512)) * 20).astype(np.float32)  # raw norms ~450
    normed = unit(raw)
    return codec.encode("face", {"embeddings": raw, "normed": normed,
                                 "mean": unit(normed.mean(0))},
                        {"model_id": model_id, "photos": str(photos)})


def faceid_payload(seed: int, photos: int = 2, dtype: str = "float16") -> bytes:
    rng = np.random.default_rng(seed)
    return codec.encode("faceid", {
        "normed": unit(rng.standard_normal((photos, 512))).astype(dtype),
        "clip_embeds": rng.standard_normal((photos, POSITIONS, CLIP_DIM)).astype(dtype),
        "clip_negative": rng.standard_normal((POSITIONS, CLIP_DIM)).astype(dtype),
    }, {"model_id": f"faceid-plusv2@{seed}", "face_model_id": BUFFALO_ID,
        "clip_model_id": CLIP_ID})
