"""InstantID's keypoint image: five facial keypoints drawn for the IdentityNet ControlNet, and
where an identity's stored keypoints go on the target canvas.

The drawing (:func:`draw_kps`) is the official ``draw_kps`` of InstantX/InstantID
``pipeline_stable_diffusion_xl_instantid.py``: on a black canvas, four limbs from the nose
(keypoint 2) to the eyes (0, 1) and the mouth corners (3, 4), each a filled ellipse
(``cv2.ellipse2Poly`` with half-axes ``(length / 2, stickwidth 4)``, centre and angle
truncated to integers) in the colour of its outer keypoint; the limbs at 0.6 of full
intensity; then a filled circle of radius 10 on each keypoint in its colour (red, green,
blue, yellow, magenta: eyes, nose, mouth corners). Coordinates are truncated with ``int``
as in the official code.

Placement (:func:`keypoint_image`), for an identity whose layout box is ``(x0, y0, x1, y1)``
(image fractions) on a ``W x H`` canvas, with keypoints stored in the pixels of its
``pw x ph`` reference photo:

* **Full-frame box**: exactly the official pipeline: the keypoints are drawn at the photo's
  own size and scale, and the ControlNet image processor resizes that drawing to the canvas
  (``prepare_image``), as when the official pipeline is given the face photo's keypoints.
* **Any other box**: the reference photo's frame is scaled uniformly to the largest size
  that fits inside the box, ``s = min(box_w / pw, box_h / ph)``, and centred in it; the
  keypoints move with it (clipped to the photo's frame first), so the face keeps its size
  and position *relative to the photo* inside the box and lies inside the box. The strokes
  keep the official sizes in proportion to the canvas: radius ``10 x min(W, H) / 1024``
  and limb half-width ``4 x min(W, H) / 1024`` (at least one pixel), since the official
  drawing belongs to an image of about 1024 px (its demo resizes the face photo to a short
  side of 1024). Anything drawn past the box's pixels is cleared, so an identity's keypoint
  image is black outside its box. To place a face higher, lower or larger, give a box
  around where the head should be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vault.errors import InvalidInput

__all__ = [
    "KPS_COLORS",
    "LIMBS",
    "Placement",
    "draw_kps",
    "keypoint_image",
    "place_in_box",
    "stroke_sizes",
]

# Official colours, RGB: left eye, right eye, nose, left mouth corner, right mouth corner.
KPS_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
LIMBS: tuple[tuple[int, int], ...] = ((0, 2), (1, 2), (3, 2), (4, 2))
RADIUS = 10
STICKWIDTH = 4
LIMB_INTENSITY = 0.6
REFERENCE_SIDE = 1024  # the image size the official stroke sizes belong to


def _check_kps(kps) -> np.ndarray:
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2) or not np.isfinite(kps).all():
        raise InvalidInput(f"keypoints must be five finite (x, y) pairs, got shape {kps.shape}")
    return kps


def draw_kps(size: tuple[int, int], kps, *, radius: int = RADIUS, stickwidth: int = STICKWIDTH,
             colors: Sequence[tuple[int, int, int]] = KPS_COLORS) -> np.ndarray:
    """The official keypoint drawing on a black ``size = (width, height)`` canvas:
    ``(height, width, 3)`` uint8 RGB."""
    import cv2

    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise InvalidInput(f"canvas size must be positive, got {size!r}")
    kps = _check_kps(kps)
    canvas = np.zeros((height, width, 3))  # float64 until the 0.6 scaling, as official
    for a, b in LIMBS:
        x, y = kps[[a, b], 0], kps[[a, b], 1]
        length = math.hypot(x[0] - x[1], y[0] - y[1])
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))),
                                   (int(length / 2), int(stickwidth)), int(angle), 0, 360, 1)
        canvas = cv2.fillConvexPoly(canvas, polygon, tuple(float(c) for c in colors[a]))
    canvas = (canvas * LIMB_INTENSITY).astype(np.uint8)
    for (x, y), color in zip(kps, colors, strict=True):
        canvas = cv2.circle(canvas, (int(x), int(y)), int(radius), tuple(int(c) for c in color),
                            -1)
    return canvas


@dataclass(frozen=True)
class Placement:
    """Photo pixels -> canvas pixels: ``p' = offset + scale * p``."""

    scale: float
    offset: tuple[float, float]
    region: tuple[float, float, float, float]  # the box in canvas pixels, x0, y0, x1, y1

    def apply(self, points) -> np.ndarray:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return pts * self.scale + np.asarray(self.offset)


def place_in_box(image_size: tuple[float, float], box: Sequence[float],
                 canvas: tuple[int, int]) -> Placement:
    """The photo's frame fitted (uniform scale, centred) inside ``box`` on ``canvas``."""
    pw, ph = (float(v) for v in image_size)
    if not (pw > 0 and ph > 0 and math.isfinite(pw) and math.isfinite(ph)):
        raise InvalidInput(f"reference photo size must be positive, got {image_size!r}")
    width, height = canvas
    x0, y0, x1, y1 = (float(v) for v in box)
    rx0, ry0, rx1, ry1 = x0 * width, y0 * height, x1 * width, y1 * height
    bw, bh = rx1 - rx0, ry1 - ry0
    scale = min(bw / pw, bh / ph)
    offset = (rx0 + (bw - scale * pw) / 2, ry0 + (bh - scale * ph) / 2)
    return Placement(scale, offset, (rx0, ry0, rx1, ry1))


def stroke_sizes(canvas: tuple[int, int]) -> tuple[int, int]:
    """``(radius, stickwidth)`` on a canvas: the official sizes per ~1024 px, at least 1."""
    k = min(canvas) / REFERENCE_SIDE
    return max(1, round(RADIUS * k)), max(1, round(STICKWIDTH * k))


def keypoint_image(kps, image_size: tuple[float, float], box: Sequence[float],
                   canvas: tuple[int, int]):
    """The identity's keypoint image for a ``canvas = (width, height)`` generation, as a PIL
    image for the ControlNet image processor (see the module docstring): at the photo's size
    for a full-frame box (the processor resizes it to the canvas), else at the canvas size."""
    from PIL import Image

    kps = _check_kps(kps)
    if tuple(float(v) for v in box) == (0.0, 0.0, 1.0, 1.0):
        pw, ph = (int(round(float(v))) for v in image_size)
        return Image.fromarray(draw_kps((pw, ph), kps))
    pw, ph = (float(v) for v in image_size)
    placement = place_in_box((pw, ph), box, canvas)
    inside = np.clip(kps, 0.0, [pw, ph])  # the face stays inside the photo's frame
    radius, stickwidth = stroke_sizes(canvas)
    drawn = draw_kps(canvas, placement.apply(inside), radius=radius, stickwidth=stickwidth)
    rx0, ry0, rx1, ry1 = placement.region
    keep = np.zeros(drawn.shape[:2], dtype=bool)
    keep[int(math.floor(ry0)):int(math.ceil(ry1)), int(math.floor(rx0)):int(math.ceil(rx1))] = True
    drawn[~keep] = 0
    return Image.fromarray(drawn)
