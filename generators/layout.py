"""Layouts: where each identity goes in the image, and its soft mask at every UNet resolution.

A layout is one box per identity, ``(x0, y0, x1, y1)`` as fractions of the
image width and height (origin top-left, ``x0 < x1``, ``y0 < y1``, all in
[0, 1]). It comes from the caller (:func:`parse_layout`: a CLI string
``"ana=0,0,0.5,1;ben=0.5,0,1,1"`` or JSON) or from :func:`auto_layout`
(vertical strips in order of mention, left to right).

Masks. For a latent of ``H x W`` the UNet works at ``H x W`` (/1), then
halves with stride-2 convolutions (``ceil(H / 2)``: a 3x3 kernel, padding 1),
so SDXL's cross-attention runs at /2 and /4 and SD1.5's at /1, /2 and /4.
:meth:`Layout.masks` gives, per identity and per factor, a flat ``(h * w,)``
float32 mask in the row-major order the UNet's transformer blocks flatten
their feature maps in; :meth:`Layout.mask_grid` gives one for any grid.

Feather. A mask is 1 deep inside its box and falls linearly to 0 at the box's
edge over ``feather`` (a fraction of the image side, so the ramp has the same
physical width at every resolution; coarse grids simply sample it more
coarsely). The ramp lies *inside* the box, so a mask is exactly 0 everywhere
outside it: an identity never acts outside its box. Edges on the image
border are not feathered (nothing lies beyond them), which makes a
full-frame box an all-ones mask, the case where regional attention must
reduce to the plain method. Per axis the value is ``clip(d / feather, 0, 1)``
with ``d`` the distance of the pixel centre from the nearer interior edge;
the mask is the smaller of the two axes' values. ``feather=0`` gives a hard
mask (1 strictly inside, 0 elsewhere).

Automatic strips overlap by ``overlap`` (default 0.1 of the width) and are
feathered by the same amount, so neighbours cross at 0.5 in the middle of
their shared band instead of leaving a seam that belongs to nobody.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vault.errors import InvalidInput

__all__ = [
    "DEFAULT_FEATHER",
    "SDXL_FACTORS",
    "Box",
    "Layout",
    "MaskConfig",
    "auto_layout",
    "choose_layout",
    "grid_at_factor",
    "grid_for_length",
    "parse_layout",
]

SDXL_FACTORS = (1, 2, 4)  # latent /1, /2, /4 (SDXL attends at /2 and /4, SD1.5 at all three)
DEFAULT_FEATHER = 0.05
DEFAULT_OVERLAP = 0.1


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in image fractions, origin top-left."""

    x0: float
    y0: float
    x1: float
    y1: float

    @classmethod
    def of(cls, values: Sequence[object], *, name: str = "box") -> Box:
        """A validated box from four numbers; InvalidInput says what is wrong."""
        if isinstance(values, (str, bytes)) or len(values) != 4:
            raise InvalidInput(f"{name}: a box is four numbers x0,y0,x1,y1 (fractions of the "
                               f"image, origin top-left), got {values!r}")
        nums = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InvalidInput(f"{name}: box coordinates must be numbers, got {v!r}")
            if not math.isfinite(v):
                raise InvalidInput(f"{name}: box coordinates must be finite, got {v!r}")
            nums.append(float(v))
        box = cls(*nums)
        problems = box.problems()
        if problems:
            raise InvalidInput(f"{name}: box {box.as_tuple()} {'; '.join(problems)}")
        return box

    def problems(self) -> list[str]:
        out = []
        if not all(0.0 <= v <= 1.0 for v in self.as_tuple()):
            out.append("must lie inside the image (every coordinate in [0, 1])")
        if not self.x0 < self.x1:
            out.append("is empty: x0 must be less than x1")
        if not self.y0 < self.y1:
            out.append("is empty: y0 must be less than y1")
        return out

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    @property
    def full_frame(self) -> bool:
        return self.as_tuple() == (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class MaskConfig:
    """How boxes become soft masks (see the module docstring)."""

    feather: float = DEFAULT_FEATHER  # ramp width, fraction of the image side

    def __post_init__(self) -> None:
        if not (math.isfinite(self.feather) and 0.0 <= self.feather <= 0.5):
            raise InvalidInput(f"feather must be in [0, 0.5], got {self.feather!r}")


def grid_at_factor(latent_size: tuple[int, int], factor: int) -> tuple[int, int]:
    """The feature-map size at a down-sampling factor (a power of two)."""
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"factor must be a power of two, got {factor}")
    h, w = latent_size
    while factor > 1:
        # UNet Downsample2D: 3x3 conv, stride 2, padding 1 -> ceil(n / 2).
        h, w, factor = (h + 1) // 2, (w + 1) // 2, factor // 2
    return h, w


def grid_for_length(latent_size: tuple[int, int], length: int) -> tuple[int, int, int]:
    """``(factor, h, w)`` of the feature map whose flattened length is ``length``.

    Attention processors see only a sequence of ``h * w`` queries; the
    latent's aspect ratio and the UNet's halving rule make the grid unique.
    """
    factor = 1
    h, w = latent_size
    while True:
        if h * w == length:
            return factor, h, w
        if h * w < length or (h == 1 and w == 1):
            raise InvalidInput(
                f"a sequence of {length} queries is no UNet resolution of a "
                f"{latent_size[0]}x{latent_size[1]} latent (the regional conditioning was built "
                "for another image size)")
        h, w, factor = (h + 1) // 2, (w + 1) // 2, factor * 2


@dataclass(frozen=True)
class Layout:
    """One box per identity, in order of mention."""

    names: tuple[str, ...]
    boxes: tuple[Box, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.boxes):
            raise InvalidInput("a layout needs exactly one box per identity")
        if len(set(self.names)) != len(self.names):
            raise InvalidInput("a layout has one box per identity; an identity is listed twice")

    def box(self, name: str) -> Box:
        try:
            return self.boxes[self.names.index(name)]
        except ValueError:
            raise InvalidInput(f"the layout has no box for {name!r} "
                               f"(it has {', '.join(self.names) or 'none'})") from None

    def mask_grid(self, name: str, h: int, w: int, config: MaskConfig = MaskConfig()) -> np.ndarray:
        """The soft mask of ``name`` on an ``h x w`` grid, flattened row-major: ``(h * w,)``."""
        return _box_mask(self.box(name), h, w, config.feather).reshape(-1)

    def masks(self, latent_size: tuple[int, int], factors: Sequence[int] = SDXL_FACTORS,
              config: MaskConfig = MaskConfig()) -> dict[int, dict[str, np.ndarray]]:
        """``{factor: {name: (h * w,) mask}}`` for every factor (latent /1, /2, /4 by default).

        Raises InvalidInput when a box covers no pixel centre at some
        factor: the identity would silently vanish from that resolution.
        """
        out: dict[int, dict[str, np.ndarray]] = {}
        for f in factors:
            h, w = grid_at_factor(latent_size, f)
            level = {}
            for name in self.names:
                m = self.mask_grid(name, h, w, config)
                if not m.any():
                    raise InvalidInput(
                        f"the box of {name} {self.box(name).as_tuple()} is too small for a "
                        f"{latent_size[1]}x{latent_size[0]} latent: it covers no feature-map "
                        f"cell at 1/{f} of it ({w}x{h}); make the box or the image larger")
                level[name] = m
            out[f] = level
        return out

    def to_string(self) -> str:
        """The CLI form, ``name=x0,y0,x1,y1;...`` (round-trips through parse_layout)."""
        return ";".join(f"{n}=" + ",".join(f"{v:g}" for v in b.as_tuple())
                        for n, b in zip(self.names, self.boxes, strict=True))


def _axis_ramp(centres: np.ndarray, lo: float, hi: float, feather: float) -> np.ndarray:
    # Distance to the nearer edge that lies inside the image; border edges
    # (0 or 1) do not count, so a box touching the border stays 1 there.
    d = np.full(centres.shape, np.inf, dtype=np.float64)
    if lo > 0.0:
        d = np.minimum(d, centres - lo)
    if hi < 1.0:
        d = np.minimum(d, hi - centres)
    inside = (centres >= lo) & (centres <= hi)
    if feather == 0.0:
        ramp = (d > 0).astype(np.float64)
    else:
        ramp = np.clip(d / feather, 0.0, 1.0)
    return np.where(inside, ramp, 0.0)


def _box_mask(box: Box, h: int, w: int, feather: float) -> np.ndarray:
    xs = (np.arange(w) + 0.5) / w  # pixel centres in image fractions
    ys = (np.arange(h) + 0.5) / h
    ax = _axis_ramp(xs, box.x0, box.x1, feather)
    ay = _axis_ramp(ys, box.y0, box.y1, feather)
    return np.minimum(ay[:, None], ax[None, :]).astype(np.float32)  # (h, w)


def auto_layout(identities: Sequence[str], *, overlap: float = DEFAULT_OVERLAP) -> Layout:
    """Vertical strips, left to right in order of mention, overlapping by ``overlap``.

    Use ``MaskConfig(feather=overlap)`` with it so neighbouring masks cross at
    0.5 in the middle of their shared band. One identity gets the full frame.
    """
    names = tuple(identities)
    if not names:
        raise InvalidInput("a layout needs at least one identity")
    if not 0.0 <= overlap < 1.0 / len(names):
        raise InvalidInput(f"overlap must be in [0, {1.0 / len(names):g}) for {len(names)} "
                           f"identities, got {overlap!r}")
    n = len(names)
    boxes = tuple(Box(max(0.0, i / n - overlap / 2), 0.0, min(1.0, (i + 1) / n + overlap / 2), 1.0)
                  for i in range(n))
    return Layout(names, boxes)


def _resolver(identities: Sequence[str]):
    """Maps a key a caller wrote (``@smiths/ana``, ``smiths/ana`` or ``ana``) to an identity."""
    full = {str(i).lstrip("@"): str(i) for i in identities}
    short: dict[str, list[str]] = {}
    for ident in full.values():
        short.setdefault(ident.rsplit("/", 1)[-1], []).append(ident)

    def resolve(key: str) -> str:
        k = key.strip().lstrip("@")
        if k in full:
            return full[k]
        hits = short.get(k, [])
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise InvalidInput(f"layout name {key!r} is ambiguous ({', '.join(hits)}); "
                               "use the full handle")
        raise InvalidInput(f"layout names {key!r}, which the prompt does not mention "
                           f"(identities: {', '.join(full.values())})")

    return resolve


def parse_layout(text: str, identities: Sequence[str]) -> Layout:
    """A layout from the CLI string or JSON, checked against the prompt's identities.

    Forms (names may be the full handle, with or without ``@``, or just the
    part after ``/`` when that is unambiguous):

    * ``"ana=0,0,0.5,1;ben=0.5,0,1,1"``
    * ``'{"ana": [0, 0, 0.5, 1], "ben": [0.5, 0, 1, 1]}'``
    * ``'[[0, 0, 0.5, 1], [0.5, 0, 1, 1]]'`` (boxes in order of mention)

    Every identity needs exactly one box; unknown, ambiguous or repeated
    names and malformed boxes raise InvalidInput. Overlapping boxes are
    allowed (both identities act where they overlap).
    """
    idents = [str(i).lstrip("@") for i in identities]
    if not idents:
        raise InvalidInput("the prompt mentions no identity, so a layout has nothing to place")
    text = text.strip()
    pairs: list[tuple[str, object]] = []
    if text[:1] in "[{":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"layout is not valid JSON: {exc}") from None
        if isinstance(doc, dict):
            pairs = list(doc.items())
        elif isinstance(doc, list):
            if len(doc) != len(idents):
                raise InvalidInput(f"a layout list needs one box per identity in order of "
                                   f"mention ({len(idents)}), got {len(doc)}")
            pairs = list(zip(idents, doc, strict=True))
        else:
            raise InvalidInput("a JSON layout is an object {name: [x0,y0,x1,y1]} or a list")
    else:
        for part in filter(None, (p.strip() for p in text.split(";"))):
            name, sep, coords = part.partition("=")
            if not sep or not name.strip():
                raise InvalidInput(f"layout entry {part!r} is not NAME=x0,y0,x1,y1")
            try:
                values = [float(c) for c in coords.split(",")]
            except ValueError:
                raise InvalidInput(f"layout entry {part!r}: coordinates must be numbers") from None
            pairs.append((name.strip(), values))
    resolve = _resolver(idents)
    boxes: dict[str, Box] = {}
    for key, values in pairs:
        ident = resolve(str(key))
        if ident in boxes:
            raise InvalidInput(f"layout gives {ident} more than one box")
        if not isinstance(values, (list, tuple)):
            raise InvalidInput(f"{ident}: a box is a list of four numbers, got {values!r}")
        boxes[ident] = Box.of(values, name=ident)
    missing = [i for i in idents if i not in boxes]
    if missing:
        raise InvalidInput(f"layout has no box for {', '.join(missing)} (one box per identity)")
    return Layout(tuple(idents), tuple(boxes[i] for i in idents))


def choose_layout(layout: str | Layout | None, identities: Sequence[str], *,
                  feather: float = DEFAULT_FEATHER,
                  auto_overlap: float = DEFAULT_OVERLAP) -> tuple[Layout, MaskConfig] | None:
    """The layout of a generation and its mask settings: ``layout`` as given (a
    :class:`Layout`, or text for :func:`parse_layout`) with ``feather``, or -- None or
    blank -- the automatic strips, feathered by their overlap so neighbours cross at 0.5.
    None when there is no identity (and a layout given anyway is refused)."""
    if not identities:
        if layout:
            raise InvalidInput("a layout was given but the prompt mentions no identity")
        return None
    if layout is None or (isinstance(layout, str) and not layout.strip()):
        return auto_layout(identities, overlap=auto_overlap), MaskConfig(feather=auto_overlap)
    if isinstance(layout, Layout):
        layout = json.dumps({n: list(b.as_tuple())
                             for n, b in zip(layout.names, layout.boxes, strict=True)})
    return parse_layout(str(layout), identities), MaskConfig(feather=feather)
