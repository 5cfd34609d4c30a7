"""Builders shared by the tests: consent records, artifacts, vault settings."""

from __future__ import annotations

import datetime as dt
import hashlib

import numpy as np

from vault import codec
from vault.consent import ConsentRequest


def consent_doc(**overrides: object) -> dict:
    doc = {
        "subject": "Ana Smith",
        "given_by": "guardian",
        "guardian_name": "Maria Smith",
        "purposes": ["enroll", "generate"],
        "retain_until": (dt.date.today() + dt.timedelta(days=365)).isoformat(),
        "evidence_sha256": hashlib.sha256(b"signed consent form").hexdigest(),
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not None}


def consent(**overrides: object) -> ConsentRequest:
    return ConsentRequest.from_dict(consent_doc(**overrides))


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def face_payload(center: np.ndarray | None = None, *, photos: int = 2, noise: float = 0.2,
                 seed: int = 0, model_id: str = "buffalo_l") -> bytes:
    rng = np.random.default_rng(seed)
    if center is None:
        center = rng.normal(size=512)
    raw = (center + noise * rng.normal(size=(photos, 512))).astype(np.float32) * 20
    normed = unit(raw)
    return codec.encode("face", {"embeddings": raw, "normed": normed,
                                 "mean": unit(normed.mean(0))}, {"model_id": model_id})


def basis_payload(coefficients: np.ndarray, *, basis_id: str = "b" * 64,
                  model_id: str = "sd15") -> bytes:
    return codec.encode("celeb_basis", {"coefficients": coefficients.astype(np.float32)},
                        {"model_id": model_id, "basis_id": basis_id})
