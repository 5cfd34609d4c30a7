"""Layouts: parsing, validation, automatic strips and feathered masks (generators.layout)."""

from __future__ import annotations

import numpy as np
import pytest

from generators.layout import (
    Box,
    Layout,
    MaskConfig,
    auto_layout,
    grid_at_factor,
    grid_for_length,
    parse_layout,
)
from vault.errors import InvalidInput

IDS = ("smiths/ana", "smiths/ben")


def test_cli_string_with_short_and_full_names() -> None:
    lay = parse_layout("ana=0,0,0.5,1; @smiths/ben=0.5,0,1,1", IDS)
    assert lay.names == IDS
    assert lay.box("smiths/ana") == Box(0, 0, 0.5, 1)
    assert lay.box("smiths/ben") == Box(0.5, 0, 1, 1)
    assert parse_layout(lay.to_string(), IDS) == lay


def test_json_object_and_list_forms() -> None:
    a = parse_layout('{"ben": [0.5, 0, 1, 1], "smiths/ana": [0, 0, 0.5, 1]}', IDS)
    b = parse_layout("[[0, 0, 0.5, 1], [0.5, 0, 1, 1]]", IDS)
    assert a == b
    assert a.names == IDS  # order of mention, whatever order the caller wrote


@pytest.mark.parametrize("text, message", [
    ("ana=0,0,0.5,1", "no box for smiths/ben"),
    ("ana=0,0,0.5,1;ben=0.5,0,1,1;cat=0,0,1,1", "'cat', which the prompt does not mention"),
    ("ana=0,0,0.5,1;ana=0.5,0,1,1;ben=0,0,1,1", "more than one box"),
    ("ana=0,0,0.5,1.2;ben=0.5,0,1,1", "inside the image"),
    ("ana=0.5,0,0.5,1;ben=0.5,0,1,1", "empty: x0 must be less than x1"),
    ("ana=0,1,1,0;ben=0.5,0,1,1", "empty: y0 must be less than y1"),
    ("ana=0,0,0.5;ben=0.5,0,1,1", "four numbers"),
    ("ana=0,0,x,1;ben=0.5,0,1,1", "must be numbers"),
    ("ana 0,0,1,1", "NAME=x0,y0,x1,y1"),
    ('{"ana": [0, 0, NaN, 1], "ben": [0.5, 0, 1, 1]}', "finite"),
    ('{"ana": "0,0,1,1", "ben": [0.5, 0, 1, 1]}', "four numbers"),
    ("[[0, 0, 1, 1]]", "one box per identity"),
    ("{nope", "not valid JSON"),
])
def test_invalid_layouts_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_layout(text, IDS)


def test_short_name_shared_by_two_owners_is_ambiguous() -> None:
    with pytest.raises(InvalidInput, match="ambiguous"):
        parse_layout("ana=0,0,0.5,1;northlight/ana=0.5,0,1,1", ("smiths/ana", "northlight/ana"))
    lay = parse_layout("smiths/ana=0,0,0.5,1;northlight/ana=0.5,0,1,1",
                       ("smiths/ana", "northlight/ana"))
    assert lay.box("northlight/ana").x0 == 0.5


def test_auto_layout_strips_in_order_of_mention_with_overlap() -> None:
    lay = auto_layout(("a/a", "b/b", "c/c"), overlap=0.1)
    assert lay.names == ("a/a", "b/b", "c/c")
    (a, b, c) = lay.boxes
    assert a.x0 == 0 and c.x1 == 1 and all(bx.y0 == 0 and bx.y1 == 1 for bx in lay.boxes)
    assert a.x1 == pytest.approx(1 / 3 + 0.05) and b.x0 == pytest.approx(1 / 3 - 0.05)
    assert auto_layout(("a/a",)).boxes == (Box(0, 0, 1, 1),)
    with pytest.raises(InvalidInput, match="overlap"):
        auto_layout(("a/a", "b/b"), overlap=0.6)


def test_grid_sizes_follow_the_unet_halving() -> None:
    assert grid_at_factor((128, 128), 2) == (64, 64)
    assert grid_at_factor((128, 96), 4) == (32, 24)
    assert grid_at_factor((9, 5), 2) == (5, 3)  # ceil, as a stride-2 conv with padding 1
    assert grid_for_length((128, 96), 32 * 24) == (4, 32, 24)
    assert grid_for_length((8, 16), 128) == (1, 8, 16)
    with pytest.raises(InvalidInput, match="another image size"):
        grid_for_length((8, 16), 100)


def test_masks_at_every_factor_are_flat_and_feathered_inside_the_box() -> None:
    lay = Layout(IDS, (Box(0, 0, 0.5, 1), Box(0.5, 0, 1, 1)))
    masks = lay.masks((32, 32), config=MaskConfig(feather=0.125))
    assert sorted(masks) == [1, 2, 4]
    for f, (h, w) in {1: (32, 32), 2: (16, 16), 4: (8, 8)}.items():
        for name in IDS:
            m = masks[f][name]
            assert m.shape == (h * w,) and m.dtype == np.float32
    ana = masks[1]["smiths/ana"].reshape(32, 32)
    # Left border is not feathered; the interior edge at x = 0.5 ramps over
    # 0.125 of the width (4 latent pixels): centres at 0.5 - (k + 0.5)/32.
    np.testing.assert_allclose(ana[10, :16], [1] * 12 + [3.5 / 4, 2.5 / 4, 1.5 / 4, 0.5 / 4],
                               rtol=1e-6)
    assert (ana[:, 16:] == 0).all()  # nothing outside the box
    assert (ana[:, 0] == 1).all() and (ana[0, :12] == 1).all()  # borders stay 1
    # Mirror symmetry between the two halves.
    np.testing.assert_array_equal(ana, masks[1]["smiths/ben"].reshape(32, 32)[:, ::-1])


def test_full_frame_box_is_all_ones_and_hard_feather_is_binary() -> None:
    full = Layout(("a/a",), (Box(0, 0, 1, 1),))
    for f, level in full.masks((8, 12)).items():
        assert (level["a/a"] == 1).all(), f
    hard = Layout(("a/a",), (Box(0.25, 0.25, 0.75, 0.75),)).mask_grid(
        "a/a", 8, 8, MaskConfig(feather=0))
    assert set(np.unique(hard)) == {0.0, 1.0}
    assert hard.reshape(8, 8)[2:6, 2:6].all() and hard.sum() == 16


def test_auto_strips_cross_at_half_in_their_shared_band() -> None:
    lay = auto_layout(IDS, overlap=0.1)
    cfg = MaskConfig(feather=0.1)
    a = lay.mask_grid("smiths/ana", 1, 200, cfg)
    b = lay.mask_grid("smiths/ben", 1, 200, cfg)
    mid = 99  # pixel centre 0.4975, next to the seam at 0.5
    assert a[mid] == pytest.approx(0.5, abs=0.03) and b[mid] == pytest.approx(0.5, abs=0.03)
    assert (a[:90] == 1).all() and (b[:90] == 0).all()
    assert ((a > 0) & (b > 0)).sum() == 20  # the band of 0.1 x 200 pixels


def test_a_box_too_small_for_a_coarse_grid_is_refused() -> None:
    lay = Layout(("a/a", "b/b"), (Box(0.0, 0.0, 0.02, 0.02), Box(0.5, 0, 1, 1)))
    with pytest.raises(InvalidInput, match="too small"):
        lay.masks((16, 16))


def test_layout_constructor_checks() -> None:
    with pytest.raises(InvalidInput):
        Layout(("a/a", "a/a"), (Box(0, 0, 1, 1), Box(0, 0, 1, 1)))
    with pytest.raises(InvalidInput, match="no box for"):
        Layout(("a/a",), (Box(0, 0, 1, 1),)).box("b/b")
    with pytest.raises(InvalidInput, match="feather"):
        MaskConfig(feather=0.9)


def test_the_documented_cli_example_parses() -> None:
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "generation.md").read_text()
    assert "\nana=0,0,0.5,1;ben=0.5,0,1,1\n" in docs
    assert parse_layout("ana=0,0,0.5,1;ben=0.5,0,1,1", IDS) == parse_layout(
        "[[0, 0, 0.5, 1], [0.5, 0, 1, 1]]", IDS)
