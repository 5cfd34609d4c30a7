"""InstantID's keypoint image (generators.adapters.keypoints): the official drawing, checked
pixel by pixel from its geometry, and the placement of a face inside a layout box."""

from __future__ import annotations

import math

import numpy as np
import pytest

from generators.adapters.keypoints import (
    KPS_COLORS,
    draw_kps,
    keypoint_image,
    place_in_box,
    stroke_sizes,
)
from vault.errors import InvalidInput

# Eyes, nose, mouth corners, far apart so no two circles touch.
KPS = np.array([[60.9, 50.0], [140.0, 50.0], [100.0, 90.0], [70.0, 130.0], [130.0, 130.0]])
LIMB_COLORS = {tuple(int(c * 0.6) for c in KPS_COLORS[i]) for i in (0, 1, 3, 4)}


def _rgb(img: np.ndarray, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(c) for c in img[y, x])


def test_circles_sit_on_the_truncated_keypoints_in_the_official_colours() -> None:
    img = draw_kps((200, 160), KPS)
    assert img.shape == (160, 200, 3) and img.dtype == np.uint8
    for (x, y), color in zip(KPS, KPS_COLORS, strict=True):
        cx, cy = int(x), int(y)  # the official int(): 60.9 -> 60, not 61
        assert _rgb(img, cx, cy) == color
        assert _rgb(img, cx + 10, cy) == color  # radius 10 reaches x + 10 ...
        assert _rgb(img, cx, cy - 10) == color
        assert _rgb(img, cx, cy - 12) == (0, 0, 0)  # ... and stops there (above: no limb)
    # Had the centre been rounded to 61, x = 71 would be inside the circle.
    assert _rgb(img, 71, 50) == (0, 0, 0)


def test_limbs_are_filled_ellipses_from_the_nose_at_six_tenths() -> None:
    img = draw_kps((200, 160), KPS)
    nose = KPS[2]
    for i in (0, 1, 3, 4):
        outer = KPS[i]
        mid = (outer + nose) / 2
        color = tuple(int(c * 0.6) for c in KPS_COLORS[i])  # 255 * 0.6 -> 153
        assert _rgb(img, int(mid[0]), int(mid[1])) == color, i
        # Half-width 4 across the limb: 2 px off the axis is inside, 7 px is not.
        axis = (outer - nose) / np.linalg.norm(outer - nose)
        normal = np.array([-axis[1], axis[0]])
        near, far = mid + 2 * normal, mid + 7 * normal
        assert _rgb(img, round(near[0]), round(near[1])) == color, i
        assert _rgb(img, round(far[0]), round(far[1])) == (0, 0, 0), i
    # Nothing but black, the five keypoint colours and the four limb colours.
    seen = {tuple(int(c) for c in p) for p in img.reshape(-1, 3)}
    assert seen == {(0, 0, 0), *KPS_COLORS, *LIMB_COLORS}


def test_keypoints_are_checked() -> None:
    with pytest.raises(InvalidInput, match="five finite"):
        draw_kps((64, 64), np.zeros((4, 2)))
    with pytest.raises(InvalidInput, match="five finite"):
        draw_kps((64, 64), np.full((5, 2), np.nan))
    with pytest.raises(InvalidInput, match="positive"):
        draw_kps((0, 64), KPS)


def test_full_frame_is_the_official_drawing_at_the_photos_own_size() -> None:
    image = keypoint_image(KPS, (200.0, 160.0), (0.0, 0.0, 1.0, 1.0), (1024, 1024))
    assert image.size == (200, 160)  # the ControlNet processor resizes it to the canvas
    np.testing.assert_array_equal(np.asarray(image), draw_kps((200, 160), KPS))


def test_a_box_gets_the_photo_frame_fitted_and_centred() -> None:
    # A 640 x 480 photo into the right half of a 1024 x 512 canvas: the 512 x 512 box is
    # limited by the width (0.8), so the frame is 512 x 384, 64 px from the top.
    p = place_in_box((640, 480), (0.5, 0.0, 1.0, 1.0), (1024, 512))
    assert p.scale == pytest.approx(0.8)
    assert p.offset == pytest.approx((512.0, 64.0))
    kps = np.array([[200.0, 150.0], [440.0, 150.0], [320.0, 260.0], [230.0, 350.0],
                    [410.0, 350.0]])
    image = np.asarray(keypoint_image(kps, (640, 480), (0.5, 0.0, 1.0, 1.0), (1024, 512)))
    assert image.shape == (512, 1024, 3)
    radius, stickwidth = stroke_sizes((1024, 512))
    assert (radius, stickwidth) == (5, 2)  # the official 10 and 4 at 1024 px, halved at 512
    for (x, y), color in zip(p.apply(kps), KPS_COLORS, strict=True):
        assert _rgb(image, int(x), int(y)) == color
        assert _rgb(image, int(x) + radius, int(y)) == color
        assert _rgb(image, int(x), int(y) - radius - 2) == (0, 0, 0)
    assert not image[:, :512].any()  # nothing left of the box
    assert stroke_sizes((1024, 1024)) == (10, 4) and stroke_sizes((64, 64)) == (1, 1)


@pytest.mark.parametrize("seed", range(6))
def test_the_face_stays_inside_its_box(seed) -> None:
    rng = np.random.default_rng(seed)
    pw, ph = rng.uniform(200, 2000, size=2)
    x0, y0 = rng.uniform(0, 0.6, size=2)
    box = (x0, y0, x0 + rng.uniform(0.2, 1 - x0), y0 + rng.uniform(0.2, 1 - y0))
    canvas = (int(rng.integers(16, 64)) * 16, int(rng.integers(16, 64)) * 16)
    bbox = np.sort(rng.uniform(0, 1, size=(2, 2)), axis=0) * [pw, ph]  # x0 y0 / x1 y1
    kps = rng.uniform(bbox[0], bbox[1], size=(5, 2))
    p = place_in_box((pw, ph), box, canvas)
    rx0, ry0, rx1, ry1 = p.region
    for x, y in np.concatenate([p.apply(bbox), p.apply(kps)]):
        assert rx0 - 1e-6 <= x <= rx1 + 1e-6 and ry0 - 1e-6 <= y <= ry1 + 1e-6
    # The frame is as large as fits: it touches two opposite sides of the box.
    w, h = p.scale * pw, p.scale * ph
    assert math.isclose(w, rx1 - rx0) or math.isclose(h, ry1 - ry0)
    # Drawn pixels (circles and limbs included) never leave the box's pixels.
    image = np.asarray(keypoint_image(kps, (pw, ph), box, canvas))
    ys, xs = np.nonzero(image.any(axis=-1))
    assert len(xs) > 0
    assert xs.min() >= math.floor(rx0) and xs.max() < math.ceil(rx1)
    assert ys.min() >= math.floor(ry0) and ys.max() < math.ceil(ry1)


def test_keypoints_outside_the_photo_are_kept_to_its_frame() -> None:
    kps = KPS.copy()
    kps[0] = (-50.0, -40.0)  # a detector may place an eye off a cropped photo
    p = place_in_box((200, 160), (0.0, 0.0, 0.5, 0.5), (512, 512))
    image = np.asarray(keypoint_image(kps, (200, 160), (0.0, 0.0, 0.5, 0.5), (512, 512)))
    x, y = p.apply([[0.0, 0.0]])[0]  # the eye, clipped to the frame's corner
    assert _rgb(image, int(x) + 1, int(y) + 1) == KPS_COLORS[0]
    assert not image[256:].any() and not image[:, 256:].any()
