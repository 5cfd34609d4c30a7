"""Face analysis for enrollment: one usable face per photo, aligned and embedded.

Wraps insightface's own model classes (``model_zoo.get_model``: SCRFD for
detection, ArcFaceONNX for recognition) so the numbers match what
PhotoMaker, StoryMaker, IP-Adapter-FaceID and InstantID compute from the
same pack. Per photo: detect faces with five keypoints, align each to the
112x112 ArcFace crop (``face_align.norm_crop``), measure quality (detector
score, face size, sharpness), insist on exactly one usable face unless the
caller picks one, and embed it. Embeddings of several photos are computed in
one recogniser run.

Models are loaded once per process and shared by every analyzer that uses
the same files, providers and detector settings (:mod:`encoders.face.models`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

import cv2
import numpy as np
from insightface.utils import face_align

from encoders.face.models import FaceModels, load_face_models
from encoders.face.pack import FacePack, find_face_pack
from encoders.photo import PhotoLimits, load_photo
from vault.errors import InvalidInput, PhotoRejected

# insightface 2.x calls scikit-image's deprecated SimilarityTransform.estimate
# on every alignment; the warning is theirs to fix and would flood our logs.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"insightface\.utils\.face_align")

Pick = Union[None, Literal["largest"], int]
ALIGN_PROBLEM = "landmarks unusable for alignment"
PhotoInput = Union[np.ndarray, bytes, str, Path]


@dataclass(frozen=True)
class FaceQuality:
    """What makes a detected face usable for enrollment.

    Defaults are deliberately lenient: they reject what is clearly unusable,
    not what is merely imperfect. They were chosen from insightface's
    conventions and the synthetic test faces, not calibrated on a labelled
    photo set; see docs/models.md.
    """

    # Candidates scoring below this are not reported as faces at all
    # (insightface's own default detection threshold).
    detect_threshold: float = 0.5
    # A usable face needs at least this detector score. Clear frontal faces
    # score 0.8-0.9 with SCRFD-10G; profile, occluded or tiny ones lower.
    min_det_score: float = 0.6
    # Shorter side of the face box in photo pixels. Alignment upsamples the
    # face to 112 px; below ~64 px the crop is mostly interpolation.
    min_face_px: float = 64.0
    # Variance of the Laplacian of the grey aligned 112x112 crop. Sharp crops
    # measure in the hundreds; a Gaussian blur of sigma 2-3 px brings them
    # below ~15.
    min_blur: float = 25.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.detect_threshold <= self.min_det_score <= 1.0:
            raise InvalidInput("need 0 <= detect_threshold <= min_det_score <= 1")
        if self.min_face_px < 0 or self.min_blur < 0:
            raise InvalidInput("min_face_px and min_blur must not be negative")


@dataclass(frozen=True)
class AnalyzerConfig:
    """How the models run (as opposed to what counts as a usable face)."""

    det_size: tuple[int, int] = (640, 640)  # detector input (width, height), like FaceAnalysis
    nms_threshold: float = 0.4  # insightface's default
    embed_batch: int = 32  # crops per recogniser run (bounds memory; R50 ~25 MB per crop)
    providers: tuple[str, ...] | None = None  # None: CUDA when usable, else CPU
    # onnxruntime intra-op threads of each model (None: one per physical core).
    # Fewer leaves cores to a web server or faiss sharing the machine.
    threads: int | None = None
    photo_limits: PhotoLimits = field(default_factory=PhotoLimits)


@dataclass(frozen=True, eq=False)
class FaceCandidate:
    """A detected face with its quality measures, before embedding."""

    index: int  # position in the photo's faces, ordered left to right
    bbox: np.ndarray  # (4,) float32 x1, y1, x2, y2 in photo pixels
    kps: np.ndarray  # (5, 2) float32: eyes, nose, mouth corners (image left first)
    det_score: float
    face_px: float  # shorter side of the box, photo pixels
    blur: float  # variance of Laplacian of the aligned crop (higher = sharper)
    aligned: np.ndarray  # (112, 112, 3) uint8 RGB
    problems: tuple[str, ...]  # empty when usable

    @property
    def usable(self) -> bool:
        return not self.problems

    @property
    def alignable(self) -> bool:
        """Whether ``aligned`` is a real crop (its keypoints allowed alignment)."""
        return ALIGN_PROBLEM not in self.problems

    def describe(self) -> str:
        x1, y1, x2, y2 = (int(round(v)) for v in self.bbox)
        where = f"face {self.index} at ({x1},{y1})-({x2},{y2})"
        return f"{where}: {'; '.join(self.problems)}" if self.problems else f"{where}: usable"


@dataclass(frozen=True, eq=False)
class FaceResult:
    """The one face chosen from a photo, embedded."""

    bbox: np.ndarray  # (4,) float32
    kps: np.ndarray  # (5, 2) float32
    det_score: float
    face_px: float
    blur: float
    embedding: np.ndarray  # (D,) float32 raw, as PhotoMaker v2 / InstantID use it
    normed: np.ndarray  # (D,) float32 L2-normalised, as StoryMaker / IP-Adapter-FaceID use it
    aligned: np.ndarray  # (112, 112, 3) uint8 RGB
    face_index: int
    faces_found: int


# -- the analyzer -------------------------------------------------------------------


class FaceAnalyzer:
    """Detect, check, align and embed faces with one insightface pack."""

    def __init__(self, pack: FacePack, quality: FaceQuality = FaceQuality(),
                 config: AnalyzerConfig = AnalyzerConfig()) -> None:
        if config.embed_batch < 1:
            raise InvalidInput("embed_batch must be at least 1")
        self.quality = quality
        self.config = config
        self.models: FaceModels = load_face_models(pack, config.providers, config.det_size,
                                                   config.nms_threshold, config.threads)

    @classmethod
    def from_models_dir(cls, models_dir: Path | str | None = None, pack: str = "buffalo_l",
                        quality: FaceQuality = FaceQuality(),
                        config: AnalyzerConfig = AnalyzerConfig()) -> FaceAnalyzer:
        """Find the pack (``--models``, ``IDVAULT_MODELS`` or ~/.insightface) and load it."""
        return cls(find_face_pack(models_dir, pack), quality, config)

    @property
    def embedding_dim(self) -> int:
        return self.models.embedding_dim

    @property
    def providers(self) -> tuple[str, ...]:
        return self.models.providers

    # -- steps (public so benches and the enrollment flow can time or reuse them)

    def locate(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw detections: boxes+scores (N, 5) and keypoints (N, 5, 2), left to right."""
        _check_image(image)
        # insightface expects BGR; cvtColor is ~5x faster than a numpy flip.
        bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
        threshold = self.quality.detect_threshold
        detector = self.models.detector
        if self.models.per_call_threshold:
            det, kps = detector.detect(bgr, input_size=self.models.det_size, det_thresh=threshold)
        else:
            # insightface < 2 fixes the threshold at prepare() (0.5); a higher
            # one of ours still applies, a lower one cannot.
            det, kps = detector.detect(bgr, input_size=self.models.det_size)
            keep = det[:, 4] >= threshold
            det, kps = det[keep], kps[keep]
        if kps is None:  # pragma: no cover - _load insists on a keypoint detector
            kps = np.zeros((len(det), 5, 2), np.float32)
        order = np.lexsort(((det[:, 1] + det[:, 3]), (det[:, 0] + det[:, 2])))
        return det[order].astype(np.float32), kps[order].astype(np.float32)

    def align(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray | None:
        """The 112x112 ArcFace crop (RGB) for five keypoints; None if they are degenerate."""
        kps = np.asarray(kps, np.float32)
        if kps.shape != (5, 2) or not np.isfinite(kps).all() or np.ptp(kps, axis=0).max() < 1.0:
            return None
        try:
            crop = face_align.norm_crop(np.ascontiguousarray(image), kps, image_size=112)
        except (ValueError, np.linalg.LinAlgError, cv2.error):
            return None
        return np.ascontiguousarray(crop)

    def embed(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Raw embeddings (N, D) float32 for aligned RGB crops, batched."""
        if len(crops) == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        recognizer = self.models.recognizer
        batch = 1 if self.models.batch_fixed else self.config.embed_batch
        out = []
        for start in range(0, len(crops), batch):
            # insightface swaps BGR to RGB inside get_feat.
            chunk = [cv2.cvtColor(c, cv2.COLOR_RGB2BGR) for c in crops[start:start + batch]]
            out.append(np.asarray(recognizer.get_feat(chunk), np.float32).reshape(len(chunk), -1))
        return np.concatenate(out, axis=0)

    # -- per photo

    def detect(self, photo: PhotoInput, *, name: str | None = None) -> list[FaceCandidate]:
        """Every face found, with quality measures and problems; none embedded."""
        return self._candidates(self._image(photo, _label(photo, name, "photo")))

    def analyze(self, photo: PhotoInput, *, pick: Pick = None,
                name: str | None = None) -> FaceResult:
        """The photo's one usable face (or the picked one), embedded."""
        return self.analyze_many([photo], pick=pick, names=[name] if name else None)[0]

    def analyze_many(self, photos: Sequence[PhotoInput], *,
                     pick: Pick | Sequence[Pick] = None,
                     names: Sequence[str] | None = None) -> list[FaceResult]:
        """Analyse several photos; one recogniser run embeds all chosen faces.

        Every photo is checked before any is embedded. If any is rejected, one
        :class:`PhotoRejected` lists each rejected photo and why
        (``details["photos"]`` maps photo name to reason); a single photo's
        rejection is raised as it is.
        """
        picks = list(pick) if isinstance(pick, (list, tuple)) else [pick] * len(photos)
        if len(picks) != len(photos) or (names is not None and len(names) != len(photos)):
            raise InvalidInput("pick and names, when lists, need one entry per photo")
        chosen: list[tuple[FaceCandidate, int]] = []
        rejected: dict[str, PhotoRejected] = {}
        for i, photo in enumerate(photos):
            fallback = "photo" if len(photos) == 1 else f"photo {i + 1}"
            label = _label(photo, names[i] if names is not None else None, fallback)
            try:
                image = self._image(photo, label)
                candidates = self._candidates(image)
                chosen.append((_select(candidates, picks[i], label), len(candidates)))
            except PhotoRejected as exc:
                rejected[label if label not in rejected else f"{label} ({i + 1})"] = exc
        if len(photos) == 1 and rejected:
            raise next(iter(rejected.values()))
        if rejected:
            lines = "\n".join(f"  - {exc}" for exc in rejected.values())
            raise PhotoRejected(f"{len(rejected)} of {len(photos)} photos rejected:\n{lines}",
                                photos={label: str(exc) for label, exc in rejected.items()})
        raw = self.embed([face.aligned for face, _ in chosen])  # (N, D)
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        normed = raw / np.maximum(norms, 1e-12)
        return [
            FaceResult(bbox=face.bbox, kps=face.kps, det_score=face.det_score,
                       face_px=face.face_px, blur=face.blur, embedding=raw[i],
                       normed=normed[i].astype(np.float32), aligned=face.aligned,
                       face_index=face.index, faces_found=found)
            for i, (face, found) in enumerate(chosen)
        ]

    # -- helpers

    def _image(self, photo: PhotoInput, label: str) -> np.ndarray:
        if isinstance(photo, np.ndarray):
            _check_image(photo)
            return np.ascontiguousarray(photo)  # OpenCV wants plain strides
        return load_photo(photo, self.config.photo_limits, name=label)

    def _candidates(self, image: np.ndarray) -> list[FaceCandidate]:
        det, kpss = self.locate(image)
        q = self.quality
        out = []
        for i, (row, kps) in enumerate(zip(det, kpss)):
            bbox, score = row[:4].copy(), float(row[4])
            face_px = float(min(bbox[2] - bbox[0], bbox[3] - bbox[1]))
            crop = self.align(image, kps)
            problems = []
            if score < q.min_det_score:
                problems.append(f"detector score {score:.2f} is below {q.min_det_score:.2f}")
            if face_px < q.min_face_px:
                problems.append(
                    f"face too small ({face_px:.0f} px, minimum {q.min_face_px:.0f} px)"
                )
            if crop is None:
                problems.append(ALIGN_PROBLEM)
                crop, blur = np.zeros((112, 112, 3), np.uint8), 0.0
            else:
                grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
                blur = float(cv2.Laplacian(grey, cv2.CV_64F).var())
                if blur < q.min_blur:
                    problems.append(f"too blurry (sharpness {blur:.1f}, minimum {q.min_blur:.1f})")
            out.append(FaceCandidate(index=i, bbox=bbox, kps=kps.copy(), det_score=score,
                                     face_px=face_px, blur=blur, aligned=crop,
                                     problems=tuple(problems)))
        return out


def _label(photo: PhotoInput, name: str | None, fallback: str) -> str:
    """What messages call a photo: the given name, a file's name, or the fallback."""
    if name:
        return name
    if isinstance(photo, (str, os.PathLike)):
        return Path(photo).name or fallback
    return fallback


def _check_image(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and image.shape[0] > 0 and image.shape[1] > 0):
        raise InvalidInput("an image must be an (H, W, 3) uint8 RGB array")


def _select(candidates: list[FaceCandidate], pick: Pick, label: str) -> FaceCandidate:
    n = len(candidates)
    if n == 0:
        raise PhotoRejected(f"{label}: no face found", photo=label, faces=0)
    found = f"found {n} face{'s' if n != 1 else ''}"
    if pick is None:
        usable = [c for c in candidates if c.usable]
        if len(usable) == 1:
            return usable[0]
        listing = "; ".join(c.describe() for c in candidates)
        if not usable:
            raise PhotoRejected(f"{label}: {found}, none usable: {listing}",
                                photo=label, faces=n)
        raise PhotoRejected(
            f"{label}: {found} and {len(usable)} are usable; a photo must show one person "
            f"clearly, or pick one ('largest', or an index 0-{n - 1} from left to right; CLI: --pick): "
            f"{listing}",
            photo=label, faces=n,
        )
    if pick == "largest":
        chosen = max(candidates, key=lambda c: float((c.bbox[2] - c.bbox[0]) *
                                                     (c.bbox[3] - c.bbox[1])))
    elif isinstance(pick, (int, np.integer)) and not isinstance(pick, bool):
        if not 0 <= pick < n:
            raise PhotoRejected(f"{label}: no face {pick}; {found} (indices 0-{n - 1})",
                                photo=label, faces=n)
        chosen = candidates[int(pick)]
    else:
        raise InvalidInput(f"pick must be None, 'largest' or a face index, not {pick!r}")
    if not chosen.usable:
        raise PhotoRejected(f"{label}: {found}; the picked {chosen.describe()}",
                            photo=label, faces=n)
    return chosen
