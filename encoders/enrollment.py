"""Enrollment: photos in, a stored, deduplicated identity out.

The one library call behind ``idvault enroll`` and the web API::

    photos -> decode safely -> exactly one usable face per photo -> ArcFace
    embeddings -> face artifact (+ the other kinds asked for: PhotoMaker ID
    embeddings, StoryMaker character tokens, IP-Adapter-FaceID Plus v2 inputs,
    InstantID inputs) -> dedupe + seal + store (Vault.store_enrollment)

Every photo must yield a face (no silent drops: one error lists each rejected
photo and why). Every model a requested kind needs is found and loaded before
any photo is analysed, so a missing file fails first. Long work reports
progress through a ``progress(stage, done, total)`` callback. 1:1 verification
and 1:N search use the same analysis. Adding kinds to an enrolled identity is
:mod:`encoders.enrollment_kinds`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from encoders.face.analyzer import FaceAnalyzer, FaceResult, PhotoInput, Pick
from encoders.face.pack import recognizer_model_id
from encoders.photo import load_photo
from encoders.preflight import check_kinds
from vault import codec
from vault.consent import ConsentRequest
from vault.errors import InvalidInput, PhotoRejected
from vault.vault import EnrollmentResult, StoredArtifact, Vault

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

Progress = Callable[[str, int, int], None]
BATCH = 16  # photos analysed per recogniser run (bounds memory, paces progress)
# IP-Adapter-FaceID was trained on this pack's normed embeddings.
FACEID_PACK = "buffalo_l"


def face_model_id(analyzer: FaceAnalyzer) -> str:
    """``<pack>/<recogniser file>@<sha256 prefix>``: ties embeddings to the weights."""
    return recognizer_model_id(analyzer.models.pack)


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
    """Runs enrollments, verifications and searches against one vault.

    ``models_dir`` is where the encoders' models are looked for (``--models`` /
    ``IDVAULT_MODELS``): the PhotoMaker and StoryMaker checkpoints, the CLIP
    ViT-H/14 tower (StoryMaker and FaceID share one loaded copy) and the
    antelopev2 pack (InstantID); each is loaded on first use and kept.
    """

    def __init__(self, vault: Vault, analyzer: FaceAnalyzer,
                 models_dir: Path | str | None = None) -> None:
        self.vault = vault
        self.analyzer = analyzer
        self.models_dir = models_dir
        self.model_id = face_model_id(analyzer)
        self._encoders: dict[str, object] = {}
        self._tower = None

    def encoder(self, kind: str):
        """The encoder of an enrollment kind other than ``face``, loaded once.

        A missing or unusable model raises ModelUnavailable naming the file and
        the folders searched; nothing else has run yet.
        """
        if kind not in self._encoders:
            if kind == "photomaker":
                from encoders.id.photomaker import PhotoMakerEncoder

                self._encoders[kind] = PhotoMakerEncoder.from_models_dir(self.models_dir)
            elif kind == "storymaker":
                self._encoders[kind] = self._storymaker()
            elif kind == "faceid":
                self.check_kinds([kind])
                from encoders.id.faceid_inputs import FaceIDEncoder

                self._encoders[kind] = FaceIDEncoder(self.clip_tower())
            elif kind == "instantid":
                from encoders.id.instantid_inputs import PACK, InstantIDEncoder

                same = self.analyzer.models.pack.spec.name == PACK
                self._encoders[kind] = (InstantIDEncoder(self.analyzer) if same else
                                        InstantIDEncoder.from_models_dir(
                                            self.models_dir, quality=self.analyzer.quality,
                                            config=self.analyzer.config))
            else:
                raise InvalidInput(f"no encoder for kind {kind!r}")
        return self._encoders[kind]

    def clip_tower(self):
        """The CLIP ViT-H/14 tower of StoryMaker and FaceID (``clip-vit-h-14``), loaded once."""
        if self._tower is None:
            from encoders.id.checkpoints import find_checkpoint
            from encoders.id.clip_vision import ClipVisionTower
            from encoders.id.photomaker import default_device

            folder = find_checkpoint("clip-vit-h-14", self.models_dir)
            self._tower = ClipVisionTower.from_pretrained(folder, device=default_device())
        return self._tower

    def _storymaker(self):
        # StoryMakerEncoder.from_models_dir, around the shared tower.
        from encoders.id.checkpoints import find_checkpoint, is_stand_in
        from encoders.id.storymaker import (
            TINY_STORYMAKER,
            StoryMakerConfig,
            StoryMakerEncoder,
            load_storymaker,
        )

        mask_bin = find_checkpoint("storymaker", self.models_dir)
        config = TINY_STORYMAKER if is_stand_in(mask_bin) else StoryMakerConfig()
        tower = self.clip_tower()
        image_proj, checkpoint = load_storymaker(mask_bin, config, device=tower.device,
                                                 dtype=tower.dtype)
        return StoryMakerEncoder(image_proj, tower, checkpoint, device=tower.device,
                                 dtype=tower.dtype)

    def check_kinds(self, kinds: Sequence[str]) -> None:
        """Refuse kinds this enroller's face analysis cannot feed (before any work)."""
        pack = self.analyzer.models.pack.spec.name
        if "faceid" in kinds and pack != FACEID_PACK:
            raise InvalidInput(
                f"faceid needs {FACEID_PACK} embeddings (IP-Adapter-FaceID was trained on "
                f"them) but this enrollment analyses faces with {pack}; enroll with --pack "
                f"{FACEID_PACK} (API: the server's pack) for faceid")

    def kind_model_id(self, kind: str) -> str:
        """The model id the artifact of ``kind`` will carry (its encoder is loaded)."""
        encoder = self.encoder(kind)
        if kind == "faceid":
            return encoder.model_id(self.model_id)
        return encoder.model_id

    def load_encoders(self, kinds: Sequence[str]) -> None:
        """Check ``kinds`` and load their models: a missing file fails before any work."""
        self.check_kinds(kinds)
        for kind in kinds:
            if kind != "face":
                self.encoder(kind)

    # -- analysis ---------------------------------------------------------------------
    def analyze(self, photos: Sequence[PhotoInput], *, names: Sequence[str] | None = None,
                pick: Pick = None, progress: Progress | None = None
                ) -> tuple[list[np.ndarray], list[FaceResult]]:
        """Decode and analyse every photo; one error lists every rejected photo.

        Returns the decoded photos (H, W, 3) uint8 RGB and their faces.
        """
        if not photos:
            raise InvalidInput("no photos given")
        names = list(names) if names is not None else [photo_label(p, i) for i, p in
                                                         enumerate(photos)]
        rejected: dict[str, str] = {}
        images: list[np.ndarray] = []
        decoded: list[str] = []  # names of the photos that decoded, in order
        for photo, name in zip(photos, names, strict=True):
            try:
                images.append(photo if isinstance(photo, np.ndarray) else
                              load_photo(photo, self.analyzer.config.photo_limits, name=name))
                decoded.append(name)
            except PhotoRejected as exc:
                rejected[name] = str(exc)
        results: list[FaceResult] = []
        # Analyse every photo that decoded, even after a failure, so one error
        # can list every problem at once.
        for start in range(0, len(images), BATCH):
            batch_names = decoded[start:start + BATCH]
            try:
                results += self.analyzer.analyze_many(images[start:start + BATCH], pick=pick,
                                                      names=batch_names)
            except PhotoRejected as exc:
                rejected.update(exc.details.get("photos") or {batch_names[0]: str(exc)})
            if progress:
                progress("analysing photos", min(start + BATCH, len(images)), len(images))
        if rejected:
            if len(photos) == 1:
                raise PhotoRejected(next(iter(rejected.values())), photos=rejected)
            lines = "\n".join(f"  - {why}" for why in rejected.values())
            raise PhotoRejected(f"{len(rejected)} of {len(photos)} photos rejected (nothing "
                                f"was stored):\n{lines}", photos=rejected)
        return images, results

    # -- enrollment -------------------------------------------------------------------
    def enroll(self, handle: str, photos: Sequence[PhotoInput], *,
               consent: ConsentRequest | None = None, kinds: Sequence[str] = ("face",),
               names: Sequence[str] | None = None, pick: Pick = None,
               masks: dict[str, np.ndarray] | None = None, cloth: np.ndarray | None = None,
               progress: Progress | None = None, actor: str | None = None,
               uid: str | None = None,
               finish: Callable[[Session, EnrollmentReport], None] | None = None
               ) -> EnrollmentReport:
        """Enroll (or add photos to) ``handle``. Raises DuplicateIdentity on a match.

        ``masks`` maps photo names to person masks (H, W) for StoryMaker's
        character crop; the photo with a mask (else the largest face) is its
        reference. ``cloth`` replaces the character crop with a clothing image.
        ``uid`` and ``finish`` go to :meth:`Vault.store_enrollment` (``finish`` gets
        the report, without the store's own timing).
        """
        kinds = list(dict.fromkeys(kinds))
        check_kinds(kinds)
        labels = list(names) if names is not None else [photo_label(p, i) for i, p in
                                                          enumerate(photos)]
        unknown_masks = sorted(set(masks or {}) - set(labels))
        if unknown_masks:
            raise InvalidInput(f"masks given for photos not enrolled: {', '.join(unknown_masks)}")
        self.load_encoders(kinds)  # a missing model fails before any work
        t0 = time.perf_counter()
        images, results = self.analyze(photos, names=labels, pick=pick, progress=progress)
        t1 = time.perf_counter()
        extra = self.encode_kinds(kinds[1:], images, results, labels, masks=masks or {},
                                  cloth=cloth, progress=progress)
        t2 = time.perf_counter()
        payload = face_payload(results, self.model_id)
        summaries = [PhotoSummary(labels[i], r.faces_found, r.face_index, r.det_score,
                                  r.face_px, r.blur) for i, r in enumerate(results)]
        timings = {"analyse": t1 - t0, "encode": t2 - t1}

        def report(stored: EnrollmentResult, **more: float) -> EnrollmentReport:
            return EnrollmentReport(stored.handle, stored.status, summaries, stored.top_match,
                                    stored.review_id, stored.artifacts, {**timings, **more})

        if progress:
            progress("dedupe and store", 0, 1)
        stored = self.vault.store_enrollment(
            handle, payload, consent_request=consent, extra=extra, actor=actor, uid=uid,
            finish=None if finish is None else lambda s, r: finish(s, report(r)))
        if progress:
            progress("dedupe and store", 1, 1)
        return report(stored, dedupe_seal_store=time.perf_counter() - t2)

    def encode_kinds(self, kinds: Sequence[str], images: list[np.ndarray],
                     faces: list[FaceResult], labels: list[str], *,
                     masks: dict[str, np.ndarray] | None = None, cloth: np.ndarray | None = None,
                     progress: Progress | None = None) -> dict[str, bytes]:
        """The payloads of ``kinds`` (not ``face``) for analysed photos, in order; progress
        stage ``computing <kind>`` at 0 of 1, then 1 of 1, for each kind."""
        out: dict[str, bytes] = {}
        for kind in kinds:
            if progress:
                progress(f"computing {kind}", 0, 1)
            out[kind] = self._encode_kind(kind, images, faces, labels, masks or {}, cloth)
            if progress:
                progress(f"computing {kind}", 1, 1)
        return out

    def _encode_kind(self, kind: str, images: list[np.ndarray], faces: list[FaceResult],
                     labels: list[str], masks: dict[str, np.ndarray],
                     cloth: np.ndarray | None) -> bytes:
        encoder = self.encoder(kind)
        if kind == "photomaker":
            tensors, meta = encoder.encode(images, faces, names=labels)
        elif kind == "faceid":
            tensors, meta = encoder.encode(images, faces, face_model_id=self.model_id,
                                           names=labels)
        elif kind == "instantid":
            tensors, meta = encoder.encode(images, faces, names=labels,
                                           analysis_model_id=self.model_id)
        else:
            from encoders.id.storymaker import pick_reference

            with_mask = [i for i, name in enumerate(labels) if name in masks]
            i = with_mask[0] if with_mask else pick_reference(faces)
            tensors, meta = encoder.encode(images[i], faces[i], mask=masks.get(labels[i]),
                                           cloth=cloth)
            meta = {**meta, "reference_photo": labels[i]}
        return codec.encode(kind, tensors, meta)

    # -- 1:1 and 1:N ------------------------------------------------------------------
    def verify(self, handle: str, photo: PhotoInput, *, pick: Pick = None,
               actor: str | None = None) -> dict:
        """Is the person in ``photo`` this identity? Scores against each enrolled photo."""
        _, [face] = self.analyze([photo], pick=pick)
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
        _, [face] = self.analyze([photo], pick=pick)
        matches = self.vault.search_faces(owner, face.normed[None], model_id=self.model_id, k=k)
        return {"owner": owner, "matches": matches,
                "block": self.vault.settings.dedupe_block,
                "review": self.vault.settings.dedupe_review}


def photo_label(photo: PhotoInput, i: int) -> str:
    """What messages call the ``i``-th photo: a file's name, else ``photo <i + 1>``."""
    return Path(photo).name if isinstance(photo, str | Path) else f"photo {i + 1}"
