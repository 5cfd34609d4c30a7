"""InstantID inputs, computed once at enrollment (artifact kind ``instantid``).

InstantID (InstantX/InstantID; ``infer.py`` and ``pipeline_stable_diffusion_xl_instantid.py``)
reads a face with insightface's **antelopev2** pack, not buffalo_l::

    app = FaceAnalysis(name="antelopev2", ...); app.prepare(ctx_id=0, det_size=(640, 640))
    face_info = app.get(cv2.cvtColor(np.array(face_image), cv2.COLOR_RGB2BGR))
    face_info = sorted(face_info, key=<box area>)[-1]     # the largest face
    face_emb = face_info["embedding"]                     # raw, NOT normed
    face_kps = draw_kps(face_image, face_info["kps"])     # IdentityNet's condition image

The embedding feeds the IP-Adapter's Resampler; the five keypoints are drawn on a
canvas for the IdentityNet ControlNet. antelopev2's recogniser (``glintr100.onnx``,
R100 trained on Glint360K) is a different network from buffalo_l's
(``w600k_r50.onnx``): its embeddings live in another space, so the artifact's
``model_id`` names that recogniser (``antelopev2/glintr100.onnx@<sha256[:16]>``,
the form of the ``face`` artifact's) and can never be taken for buffalo_l's.

Per enrolled photo this module runs antelopev2's detector and recogniser
(the same steps as :class:`encoders.face.analyzer.FaceAnalyzer`, with that pack) and
keeps, of the faces it finds, **the one the enrollment's own analysis chose**
(buffalo_l's pick, by ``--pick`` or the one usable face): the antelopev2
detection whose box overlaps it most, which must reach :data:`MIN_IOU`
intersection over union, else that photo is refused with a clear reason (one
error lists every such photo; nothing is stored). Only alignment is required of
that detection: whether the face is usable was decided by the enrollment's own
quality checks. When the enrollment itself analyses with antelopev2
(``--pack antelopev2``), its results are used as they are.

Stored: the raw embedding of every photo, and the reference photo's five
keypoints (pixels, in insightface's order: left eye, right eye, nose, left and
right mouth corner as seen in the image), face box and photo size, so the
generator can redraw the keypoints inside each person's region at any canvas size.
The reference is the photo whose antelopev2 face box has the largest area
(official InstantID takes the largest face of its one photo), then the higher
detector score, then the earlier photo.

Integration contract (for enrollment)::

    encoder = InstantIDEncoder.from_models_dir(models_dir)    # the antelopev2 pack
    tensors, metadata = encoder.encode(photos, faces, names=...)
    payload = vault.codec.encode("instantid", tensors, metadata)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from encoders.face.analyzer import AnalyzerConfig, FaceAnalyzer, FaceQuality
from encoders.face.pack import recognizer_model_id
from vault.errors import InvalidInput, PhotoRejected

__all__ = ["MIN_IOU", "PACK", "AntelopeFace", "InstantIDEncoder", "box_iou", "pick_reference"]

PACK = "antelopev2"
# Two detectors' boxes of one face overlap far more than this (SCRFD-10G in both
# packs); two neighbouring faces in one photo overlap far less.
MIN_IOU = 0.5


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    ax0, ay0, ax1, ay1 = (float(v) for v in a[:4])
    bx0, by0, bx1, by1 = (float(v) for v in b[:4])
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True, eq=False)
class AntelopeFace:
    """antelopev2's view of the enrolled face in one photo."""

    bbox: np.ndarray  # (4,) float32 x0, y0, x1, y1 in photo pixels
    kps: np.ndarray  # (5, 2) float32 (x, y) in photo pixels
    det_score: float
    embedding: np.ndarray  # (512,) float32, raw (not normalised)
    iou: float  # overlap with the enrollment's chosen face box (1.0 when it is that face)

    @property
    def area(self) -> float:
        return float((self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1]))


def pick_reference(faces: Sequence[AntelopeFace]) -> int:
    """The photo whose face box is the largest (then higher score, then earlier)."""
    if not faces:
        raise InvalidInput("no faces to choose from")
    return max(range(len(faces)), key=lambda i: (faces[i].area, faces[i].det_score, -i))


class InstantIDEncoder:
    """Photos + the enrollment's chosen faces -> the ``instantid`` artifact."""

    kind = "instantid"

    def __init__(self, analyzer: FaceAnalyzer) -> None:
        if analyzer.models.pack.spec.name != PACK:
            raise InvalidInput(f"InstantID reads faces with the {PACK} pack, not "
                               f"{analyzer.models.pack.spec.name}")
        self.analyzer = analyzer
        self.model_id = recognizer_model_id(analyzer.models.pack)

    @classmethod
    def from_models_dir(cls, models_dir: Path | str | None = None, *,
                        quality: FaceQuality = FaceQuality(),
                        config: AnalyzerConfig = AnalyzerConfig()) -> InstantIDEncoder:
        """Find and load antelopev2 (``scrfd_10g_bnkps.onnx`` + ``glintr100.onnx``);
        ModelUnavailable names the files and every folder searched."""
        return cls(FaceAnalyzer.from_models_dir(models_dir, pack=PACK, quality=quality,
                                                config=config))

    def same_analysis(self, model_id: str) -> bool:
        """Whether an enrollment analysing with ``model_id`` already is this analysis."""
        return model_id == self.model_id

    def faces(self, photos: Sequence[np.ndarray], chosen: Sequence[object], *,
              names: Sequence[str]) -> list[AntelopeFace]:
        """antelopev2's detection and raw embedding of each photo's chosen face.

        ``chosen`` are the enrollment's analysis results (``bbox`` of each). One
        :class:`PhotoRejected` lists every photo whose face antelopev2 does not find.
        """
        found: list[tuple[object, float]] = []
        rejected: dict[str, str] = {}
        for photo, face, name in zip(photos, chosen, names, strict=True):
            candidates = [c for c in self.analyzer.detect(photo, name=name) if c.alignable]
            overlaps = [box_iou(c.bbox, face.bbox) for c in candidates]
            best = int(np.argmax(overlaps)) if overlaps else -1
            if best < 0 or overlaps[best] < MIN_IOU:
                where = ", ".join(f"{v:.0f}" for v in face.bbox[:4])
                seen = (f"its best overlap is {overlaps[best]:.2f}, below {MIN_IOU}"
                        if best >= 0 else "it found no alignable face")
                rejected[name] = (f"{name}: the {PACK} detector (InstantID's) does not find "
                                  f"the enrolled face at ({where}): {seen}")
                continue
            found.append((candidates[best], overlaps[best]))
        if rejected:
            lines = "\n".join(f"  - {why}" for why in rejected.values())
            raise PhotoRejected(f"{len(rejected)} of {len(photos)} photos cannot give InstantID "
                                f"its face (nothing was stored):\n{lines}", photos=rejected)
        raw = self.analyzer.embed([c.aligned for c, _ in found])  # (photos, 512), one run
        return [AntelopeFace(bbox=c.bbox.astype(np.float32), kps=c.kps.astype(np.float32),
                             det_score=c.det_score, embedding=raw[i], iou=iou)
                for i, (c, iou) in enumerate(found)]

    def encode(self, photos: Sequence[np.ndarray], chosen: Sequence[object], *,
               names: Sequence[str] | None = None, analysis_model_id: str | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Tensors and metadata for ``vault.codec.encode("instantid", ...)``.

        ``analysis_model_id`` is the enrollment's face model id: when it is this
        pack's recogniser, ``chosen`` already holds antelopev2's faces and embeddings.
        """
        if len(photos) != len(chosen):
            raise InvalidInput("one face per photo")
        names = list(names) if names is not None else [f"photo {i + 1}"
                                                       for i in range(len(photos))]
        if analysis_model_id is not None and self.same_analysis(analysis_model_id):
            faces = [AntelopeFace(bbox=np.asarray(f.bbox, np.float32),
                                  kps=np.asarray(f.kps, np.float32), det_score=f.det_score,
                                  embedding=np.asarray(f.embedding, np.float32), iou=1.0)
                     for f in chosen]
        else:
            faces = self.faces(photos, chosen, names=names)
        i = pick_reference(faces)
        ref = faces[i]
        height, width = photos[i].shape[:2]
        tensors = {"embeddings": np.stack([f.embedding for f in faces]).astype(np.float32),
                   "kps": ref.kps.astype(np.float32),  # (5, 2)
                   "bbox": ref.bbox[:4].astype(np.float32),  # (4,)
                   "image_size": np.array([width, height], np.float32)}
        return tensors, {"model_id": self.model_id, "reference_photo": names[i]}
