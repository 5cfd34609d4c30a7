"""Enrollment: photos in, a stored, deduplicated identity out.

The one library call behind ``idvault enroll`` and the web API::

    photos -> decode safely -> exactly one usable face per photo -> ArcFace
    embeddings -> face artifact -> dedupe + seal + store (Vault.store_enrollment)

Every photo must yield a face (no silent drops: one error lists each rejected
photo and why). Long work reports progress through a ``progress(stage, done,
total)`` callback. 1:1 verification and 1:N search use the same analysis.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from encoders.face_analyzer import FaceAnalyzer, FaceResult, PhotoInput, Pick
from encoders.face_pack import sha256_file
from vault import codec
from vault.consent import ConsentRequest
from vault.errors import InvalidInput, PhotoRejected
from vault.vault import EnrollmentResult, StoredArtifact, Vault

Progress = Callable[[str, int, int], None]
ENROLL_KINDS = ("face",)  # kinds computed at enrollment by this version
BATCH = 16  # photos analysed per recogniser run (bounds memory, paces progress)


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime: float) -> str:
    return sha256_file(Path(path))


def face_model_id(analyzer: FaceAnalyzer) -> str:
    """``<pack>/<recogniser file>@<sha256 prefix>``: ties embeddings to the weights."""
    pack = analyzer.models.pack
    path = pack.recognizer_path
    st = path.stat()
    return f"{pack.spec.name}/{path.name}@{_file_digest(str(path), st.st_size, st.st_mtime)[:16]}"


def face_payload(results: Sequence[FaceResult], model_id: str) -> bytes:
    """The ``face`` artifact of a set of analysed photos."""
    raw = np.stack([r.embedding for r in results]).astype(np.float32)  # (photos, 512)
    normed = np.stack([r.normed for r in results]).astype(np.float32)  # (photos, 512)
    mean = normed.mean(0)
    return codec.encode("face", {"embeddings": raw, "normed": normed,
                                 "mean": mean / np.linalg.norm(mean)},
                        {"model_id": model_id, "photos": str(len(results))})


@dataclass(frozen=True)
class PhotoSummary:
    name: str
    faces_found: int
    face_index: int
    det_score: float
    face_px: float
    blur: float

    def to_json(self) -> dict:
        return {"photo": self.name, "faces_found": self.faces_found, "face": self.face_index,
                "det_score": round(self.det_score, 3), "face_px": round(self.face_px, 1),
                "blur": round(self.blur, 1)}


@dataclass(frozen=True)
class EnrollmentReport:
    handle: str
    status: str  # active | held | updated
    photos: list[PhotoSummary]
    top_match: dict | None
    review_id: int | None
    artifacts: list[StoredArtifact]
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"handle": self.handle, "status": self.status,
                "photos": [p.to_json() for p in self.photos], "top_match": self.top_match,
                "review_id": self.review_id,
                "artifacts": [{"id": a.id, "kind": a.kind, "model_id": a.model_id,
                               "size": a.size} for a in self.artifacts],
                "timings": {k: round(v, 4) for k, v in self.timings.items()}}


class Enroller:
    """Runs enrollments, verifications and searches against one vault."""

    def __init__(self, vault: Vault, analyzer: FaceAnalyzer) -> None:
        self.vault = vault
        self.analyzer = analyzer
        self.model_id = face_model_id(analyzer)

    # -- analysis ---------------------------------------------------------------------
    def analyze(self, photos: Sequence[PhotoInput], *, names: Sequence[str] | None = None,
                pick: Pick = None, progress: Progress | None = None) -> list[FaceResult]:
        """Analyse every photo in batches; one error lists every rejected photo."""
        if not photos:
            raise InvalidInput("no photos given")
        names = list(names) if names is not None else [
            Path(p).name if isinstance(p, str | Path) else f"photo {i + 1}"
            for i, p in enumerate(photos)]
        results: list[FaceResult] = []
        rejected: dict[str, str] = {}
        for start in range(0, len(photos), BATCH):
            chunk = list(photos[start:start + BATCH])
            try:
                results += self.analyzer.analyze_many(chunk, pick=pick,
                                                      names=names[start:start + BATCH])
            except PhotoRejected as exc:
                rejected.update(exc.details.get("photos") or {names[start]: str(exc)})
            if progress:
                progress("analysing photos", min(start + BATCH, len(photos)), len(photos))
        if rejected:
            if len(photos) == 1:
                raise PhotoRejected(next(iter(rejected.values())), photos=rejected)
            lines = "\n".join(f"  - {why}" for why in rejected.values())
            raise PhotoRejected(f"{len(rejected)} of {len(photos)} photos rejected (nothing "
                                f"was stored):\n{lines}", photos=rejected)
        return results

    # -- enrollment -------------------------------------------------------------------
    def enroll(self, handle: str, photos: Sequence[PhotoInput], *,
               consent: ConsentRequest | None = None, kinds: Sequence[str] = ("face",),
               names: Sequence[str] | None = None, pick: Pick = None,
               progress: Progress | None = None, actor: str | None = None) -> EnrollmentReport:
        """Enroll (or add photos to) ``handle``. Raises DuplicateIdentity on a match."""
        unknown = [k for k in kinds if k not in ENROLL_KINDS]
        if unknown or "face" not in kinds:
            raise InvalidInput(f"enrollment computes these kinds: {', '.join(ENROLL_KINDS)} "
                               f"(asked for {', '.join(kinds)}); 'face' is always required")
        t0 = time.perf_counter()
        results = self.analyze(photos, names=names, pick=pick, progress=progress)
        t1 = time.perf_counter()
        payload = face_payload(results, self.model_id)
        if progress:
            progress("dedupe and store", 0, 1)
        stored: EnrollmentResult = self.vault.store_enrollment(
            handle, payload, consent_request=consent, actor=actor)
        t2 = time.perf_counter()
        if progress:
            progress("dedupe and store", 1, 1)
        labels = list(names) if names is not None else [
            Path(p).name if isinstance(p, str | Path) else f"photo {i + 1}"
            for i, p in enumerate(photos)]
        summaries = [PhotoSummary(labels[i], r.faces_found, r.face_index, r.det_score,
                                  r.face_px, r.blur) for i, r in enumerate(results)]
        return EnrollmentReport(stored.handle, stored.status, summaries, stored.top_match,
                                stored.review_id, stored.artifacts,
                                {"analyse": t1 - t0, "dedupe_seal_store": t2 - t1})

    # -- 1:1 and 1:N ------------------------------------------------------------------
    def verify(self, handle: str, photo: PhotoInput, *, pick: Pick = None,
               actor: str | None = None) -> dict:
        """Is the person in ``photo`` this identity? Scores against each enrolled photo."""
        [face] = self.analyze([photo], pick=pick)
        stored = self.vault.get_artifact(handle, "face", model_id=self.model_id,
                                         purpose="enroll", actor=actor)
        scores = stored.artifact.tensors["normed"] @ face.normed  # (photos,)
        best = float(scores.max())
        threshold = self.vault.settings.dedupe_review
        return {"handle": stored.handle, "best": round(best, 4),
                "mean": round(float(scores.mean()), 4),
                "scores": [round(float(s), 4) for s in scores], "threshold": threshold,
                "decision": "same" if best >= threshold else "different"}

    def search(self, owner: str, photo: PhotoInput, *, k: int = 5, pick: Pick = None) -> dict:
        """The owner's closest identities to the person in ``photo``."""
        [face] = self.analyze([photo], pick=pick)
        matches = self.vault.search_faces(owner, face.normed[None], model_id=self.model_id, k=k)
        return {"owner": owner, "matches": matches,
                "block": self.vault.settings.dedupe_block,
                "review": self.vault.settings.dedupe_review}
