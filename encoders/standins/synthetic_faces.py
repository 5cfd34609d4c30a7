"""Drawing synthetic "people" for the tiny stand-in face models.

A synthetic face is a disc outlined by a magenta ring, with five coloured dots
where insightface's five keypoints would be (eyes, nose, mouth corners) and a
smooth colour pattern inside that is fixed by ``person_seed``: the person's
"identity". ``photo_seed`` varies everything a second photo of the same person
would: position, size, a small rotation, lighting, colour cast, sensor noise
and the background. The tiny detector (:mod:`encoders.standins.face_pack`) finds the
ring and dots; the tiny recogniser embeds the pattern, so two photos of one
synthetic person embed close together and two people far apart.

**These are not faces and carry no real likeness**; they are test fixtures
for the face-analysis code path and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

# insightface's ArcFace alignment target on a 112x112 crop (face_align.arcface_dst):
# left eye, right eye, nose, left and right mouth corner. A test checks the copy.
ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
# Keypoints in face radii from the disc centre: norm_crop then maps the disc
# onto the crop's inscribed circle, the same for every photo.
KP_TEMPLATE = (ARCFACE_DST - 56.0) / 56.0  # (5, 2)

RING_COLOUR = (255, 0, 255)  # magenta
DOT_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255))
RING_INNER = 0.85  # inner edge of the ring, in face radii
DOT_RADIUS = 0.07  # in face radii (at least 1.5 px)
_PATTERN_GRID = 16
_PATTERN_RES = 64


@dataclass(frozen=True)
class SyntheticFace:
    """One face to draw. Positions and sizes are fractions of the photo."""

    person_seed: int
    center: tuple[float, float] = (0.5, 0.5)  # (x, y) as fractions of width, height
    radius: float = 0.28  # fraction of the photo's shorter side
    marker_strength: float = 1.0  # 1 = pure magenta ring; lower = fainter (lower score)
    # (other person_seed, share): blend in another person's pattern, e.g. a twin
    # or sibling whose embedding lands between "same" and "different".
    kin: tuple[int, float] | None = None


def synthetic_face(
    person_seed: int,
    photo_seed: int,
    size: int | tuple[int, int] = 256,
    *,
    radius: float = 0.28,
    center: tuple[float, float] = (0.5, 0.5),
    marker_strength: float = 1.0,
    blur_sigma: float = 0.0,
    jitter: bool = True,
    kin: tuple[int, float] | None = None,
) -> np.ndarray:
    """A photo of one synthetic person: (H, W, 3) uint8 RGB. No real likeness."""
    face = SyntheticFace(person_seed, center=center, radius=radius,
                         marker_strength=marker_strength, kin=kin)
    return synthetic_photo([face], photo_seed, size, blur_sigma=blur_sigma, jitter=jitter)


def synthetic_photo(
    faces: Sequence[SyntheticFace],
    photo_seed: int,
    size: int | tuple[int, int] = 256,
    *,
    blur_sigma: float = 0.0,
    jitter: bool = True,
) -> np.ndarray:
    """A photo with any number of synthetic faces (none gives a faceless photo).

    ``size`` is an int (square) or (height, width). ``blur_sigma`` blurs the
    whole photo (Gaussian, pixels) after noise, like a missed focus.
    Deterministic in its arguments.
    """
    height, width = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng([photo_seed, 0x5EED])
    image = _background(rng, height, width)
    for face in faces:
        _draw_face(image, face, rng, jitter)
    # Lighting: overall exposure, a slight colour cast, a linear gradient.
    if jitter:
        exposure = rng.uniform(0.8, 1.15)
        cast = rng.uniform(0.96, 1.04, size=3)
        angle = rng.uniform(0, 2 * np.pi)
        amplitude = rng.uniform(-12, 12)
        noise = rng.uniform(2.0, 5.0)
    else:
        exposure, cast, angle, amplitude, noise = 1.0, np.ones(3), 0.0, 0.0, 0.0
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = ((xs / width - 0.5) * np.cos(angle) + (ys / height - 0.5) * np.sin(angle)) * amplitude
    image = image * (exposure * cast).astype(np.float32) + ramp[:, :, None]
    if noise:
        image += rng.normal(0.0, noise, image.shape).astype(np.float32)
    image = np.clip(image, 0, 255)
    if blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), blur_sigma)
    return np.ascontiguousarray(np.rint(image).astype(np.uint8))


def crop_pattern_mask(size: int = 112) -> np.ndarray:
    """Where the identity pattern lies on an aligned crop: (size, size) float32 in {0, 1}.

    Inside the ring (with a margin) and away from the keypoint dots, so the
    recogniser sees only what differs between people.
    """
    scale = size / 112.0
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    centre = 56.0 * scale
    mask = np.hypot(xs - centre, ys - centre) < 0.8 * 56.0 * scale
    for x, y in ARCFACE_DST * scale:
        mask &= np.hypot(xs - x, ys - y) > 0.13 * 56.0 * scale
    return mask.astype(np.float32)


# -- drawing -------------------------------------------------------------------


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-saturation smooth texture: never close to the marker colours."""
    grey = rng.uniform(70, 200, size=(5, 5)).astype(np.float32)
    tint = rng.uniform(-10, 10, size=(5, 5, 3)).astype(np.float32)
    coarse = grey[:, :, None] + tint
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


@lru_cache(maxsize=4096)
def _identity(person_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(skin RGB (3,), pattern (64, 64, 3)) of one synthetic person."""
    rng = np.random.default_rng([person_seed, 0xFACE])
    skin = rng.uniform(140, 180) + np.array([14.0, 0.0, -10.0])
    luminance = rng.standard_normal((_PATTERN_GRID, _PATTERN_GRID, 1)) * 32.0
    chroma = rng.standard_normal((_PATTERN_GRID, _PATTERN_GRID, 3)) * 8.0
    coarse = (luminance + chroma).astype(np.float32)
    pattern = cv2.resize(coarse, (_PATTERN_RES, _PATTERN_RES), interpolation=cv2.INTER_CUBIC)
    pattern.setflags(write=False)
    return skin.astype(np.float32), pattern


def _draw_face(image: np.ndarray, face: SyntheticFace, rng: np.random.Generator,
               jitter: bool) -> None:
    height, width = image.shape[:2]
    # Draw the jitter even when unused so faces after this one are unaffected.
    j = rng.uniform(-1, 1, size=4)
    shift, grow, turn = (0.06, 0.1, np.deg2rad(8.0)) if jitter else (0.0, 0.0, 0.0)
    cx = (face.center[0] + shift * j[0]) * width
    cy = (face.center[1] + shift * j[1]) * height
    r = face.radius * min(height, width) * (1.0 + grow * j[2])
    theta = turn * j[3]
    skin, pattern = _identity(face.person_seed)
    if face.kin is not None:
        other_skin, other_pattern = _identity(face.kin[0])
        share = float(np.clip(face.kin[1], 0.0, 1.0))
        # Square-root weights keep the pattern's contrast whatever the share.
        pattern = np.sqrt(share) * other_pattern + np.sqrt(1 - share) * pattern
        skin = share * other_skin + (1 - share) * skin

    x0, x1 = max(int(cx - r) - 2, 0), min(int(cx + r) + 3, width)
    y0, y1 = max(int(cy - r) - 2, 0), min(int(cy + r) + 3, height)
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xs - cx, ys - cy
    cos, sin = np.cos(theta), np.sin(theta)
    u = (cos * dx + sin * dy) / r  # face-relative coordinates, in radii
    v = (-sin * dx + cos * dy) / r
    dist = np.hypot(dx, dy)

    half = (_PATTERN_RES - 1) / 2.0
    inside = cv2.remap(pattern, ((u + 1) * half).astype(np.float32),
                       ((v + 1) * half).astype(np.float32), cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_REPLICATE) + skin
    strength = float(np.clip(face.marker_strength, 0.0, 1.0))
    ring = strength * np.array(RING_COLOUR, np.float32) + (1 - strength) * skin
    a_inner = np.clip(RING_INNER * r - dist + 0.5, 0, 1)[:, :, None]
    a_disc = np.clip(r - dist + 0.5, 0, 1)[:, :, None]
    patch = image[y0:y1, x0:x1]
    colour = a_inner * inside + (1 - a_inner) * ring
    patch[:] = a_disc * colour + (1 - a_disc) * patch

    dot_r = max(DOT_RADIUS * r, 1.5)
    rot = np.array([[cos, -sin], [sin, cos]], np.float32)
    for (tx, ty), dot in zip(KP_TEMPLATE, DOT_COLOURS):
        px, py = np.array([cx, cy]) + r * rot @ np.array([tx, ty])
        a_dot = np.clip(dot_r - np.hypot(xs - px, ys - py) + 0.5, 0, 1)[:, :, None]
        patch[:] = a_dot * np.array(dot, np.float32) + (1 - a_dot) * patch
