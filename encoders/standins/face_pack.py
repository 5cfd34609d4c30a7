"""Tiny, deterministic stand-ins for an insightface face pack, for tests and benches.

No face model weights exist on the machines idvault is developed and tested
on, and the real packs may not be redistributed. This module writes a pack in
the real layout (buffalo_l's ``det_10g.onnx`` + ``w600k_r50.onnx``, or
antelopev2's ``scrfd_10g_bnkps.onnx`` + ``glintr100.onnx``) whose graphs have the
real input/output names and shapes, so insightface's ``model_zoo`` classifies
and runs them exactly as it does the real files, but whose weights are built
by hand to respond to *drawn* synthetic faces (see
:mod:`encoders.standins.synthetic_faces`).

**These models recognise no real face and produce no real likeness.** The
detector finds a magenta ring with five coloured dots; the recogniser
projects the pattern painted inside the ring. They exist only so the code
path users take (decode, detect, align, embed, quality checks, batching) can
be tested end to end without licensed weights.

How the detector works, per stride s in (8, 16, 32) (SCRFD's output contract,
2 anchors per cell, rows row-major with anchors innermost):

1. Per pixel, six colour features (ring magenta and the five dot colours)
   become soft masks in [0, 1].
2. Sum pooling gives, per stride-s cell, each mask's mass and first moments
   (mass times absolute x and y), plus the ring's radial second moment.
   Stride-8 cells are pooled 2x2 into stride-16 ones, and so on.
3. Separable box sums over the (2k+1)^2 cells around every anchor give each
   mask's exact mass and centroid there; a wider "band" sum tells whether
   the ring lies wholly inside that window.
4. The ring's centroid is the face centre, its area gives the radius (the
   box), each dot's centroid is a keypoint, and the score is the ring's colour
   purity (a faint ring scores lower), gated to the anchor nearest the centre,
   with the ring wholly inside the window and spread like one ring rather
   than two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from encoders.face.pack import pack_spec
from encoders.standins.synthetic_faces import (
    KP_TEMPLATE,
    RING_INNER,
    SyntheticFace,
    crop_pattern_mask,
    synthetic_face,
    synthetic_photo,
)

__all__ = [
    "DETECTOR_INPUT",
    "DETECTOR_OUTPUTS",
    "RECOGNIZER_INPUT",
    "RECOGNIZER_OUTPUT",
    "RECOGNIZER_SEEDS",
    "TinyDetectorConfig",
    "TinyRecognizerConfig",
    "SyntheticFace",
    "build_tiny_detector",
    "build_tiny_recognizer",
    "synthetic_face",
    "synthetic_photo",
    "write_tiny_face_pack",
]

# The names the real buffalo_l files use (det_10g: scores, boxes, keypoints,
# each for strides 8, 16, 32; w600k_r50: one 512-d output). Keeping them means
# code that addresses outputs by name works on the stand-ins too.
DETECTOR_INPUT = "input.1"
DETECTOR_OUTPUTS = ("448", "471", "494", "451", "474", "497", "454", "477", "500")
RECOGNIZER_INPUT = "input.1"
RECOGNIZER_OUTPUT = "683"

OPSET = 17
IR_VERSION = 8  # old enough for any onnxruntime that supports opset 17
STRIDES = (8, 16, 32)
NUM_ANCHORS = 2


@dataclass(frozen=True)
class TinyDetectorConfig:
    """Knobs of the hand-built detector (units: detector-input pixels)."""

    # Window half-width in cells per stride: a face is found at a stride when
    # radius + stride/2 <= k * stride. Larger strides see larger faces.
    window_cells: tuple[int, int, int] = (6, 8, 8)
    band_cells: int = 2  # ring mass this far outside the window vetoes the anchor
    feature_lo: float = 80.0  # colour feature (0-255 scale) mapped to mask 0 ...
    feature_hi: float = 140.0  # ... and to mask 1
    min_ring_mass: float = 40.0  # smaller rings (radius < ~7 px) are ignored
    band_tolerance: float = 0.02  # fraction of the ring's mass allowed in the band
    shape_tolerance: float = 0.25  # relative misfit of the ring's spread fully accepted


@dataclass(frozen=True)
class TinyRecognizerConfig:
    """Knobs of the hand-built recogniser."""

    embedding_dim: int = 512
    grid: int = 16  # the 112 px crop is pooled to grid x grid cells (7 px each)
    seed: int = 20240611  # of the random projection
    # Sets the raw embedding norm: ~15 on synthetic faces, within the range
    # of real ArcFace raw norms (~15-30), which PhotoMaker v2 consumes as is.
    norm_scale: float = 22.0


# Each pack's stand-in recogniser projects with its own random matrix, so, as with the
# real R50 (buffalo_l) and R100 (antelopev2), the two packs' embeddings of one face
# differ: code that mixed them up would fail the tests. The detector is shared (the
# real packs both detect with SCRFD-10G).
RECOGNIZER_SEEDS = {"buffalo_l": TinyRecognizerConfig.seed, "antelopev2": 20240612}


def write_tiny_face_pack(directory: Path, pack: str = "buffalo_l") -> Path:
    """Write the stand-in detector and recogniser under the pack's real file names.

    The files go straight into ``directory`` (one of the layouts
    :func:`encoders.face.pack.find_face_pack` accepts); returns ``directory``.
    Deterministic: the same bytes every time. Each pack gets its own recogniser
    (:data:`RECOGNIZER_SEEDS`).
    """
    spec = pack_spec(pack)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(build_tiny_detector(), str(directory / spec.detector))
    recognizer = TinyRecognizerConfig(seed=RECOGNIZER_SEEDS[spec.name])
    onnx.save(build_tiny_recognizer(recognizer), str(directory / spec.recognizer))
    return directory


# -- graph building ------------------------------------------------------------


class _Graph:
    """A minimal ONNX graph builder: named constants and nodes, no magic."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}_{hint}_{self._n}"

    def const(self, value: np.ndarray | float | list, hint: str = "c", dtype=np.float32) -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int = 1,
           out_names: list[str] | None = None, **attrs) -> str | list[str]:
        names = out_names or [self._name(hint or op_type.lower()) for _ in range(outputs)]
        # Node names never start with "Sub"/"Mul": insightface's ArcFaceONNX
        # takes that as an MXNet graph with built-in normalisation.
        self.nodes.append(helper.make_node(op_type, inputs, names,
                                           name=self._name("node_" + op_type.lower()), **attrs))
        return names[0] if outputs == 1 else names

    def clip01(self, x: str) -> str:
        return self.op("Clip", [x, self.const(0.0), self.const(1.0)])


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="idvault-tiny")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def build_tiny_detector(config: TinyDetectorConfig = TinyDetectorConfig()) -> onnx.ModelProto:
    """SCRFD-shaped detector: input (1, 3, ?, ?), 9 outputs (N, 1|4|10)."""
    g = _Graph("det")
    x = DETECTOR_INPUT  # (1, 3, H, W), (px - 127.5) / 128, RGB
    r, gr, b = g.op("Split", [x, g.const([1, 1, 1], dtype=np.int64)], outputs=3, axis=1)

    def mn(a: str, c: str) -> str:
        return g.op("Min", [a, c])

    def mx(a: str, c: str) -> str:
        return g.op("Max", [a, c])

    def minus(a: str, c: str) -> str:
        return g.op("Sub", [a, c])

    # Colour features, each (1, 1, H, W): how strongly a pixel is that colour.
    # Order: ring first, then the five keypoint dots in insightface's order.
    features = [
        minus(mn(r, b), gr),  # magenta: the ring
        minus(r, mx(gr, b)),  # red: left eye
        minus(gr, mx(r, b)),  # green: right eye
        minus(b, mx(r, gr)),  # blue: nose
        minus(mn(r, gr), b),  # yellow: left mouth corner
        minus(mn(gr, b), r),  # cyan: right mouth corner
    ]
    feats = g.op("Concat", features, axis=1)  # (1, 6, H, W)
    lo, hi = config.feature_lo / 128.0, config.feature_hi / 128.0
    masks = g.clip01(g.op("Div", [g.op("Sub", [feats, g.const(lo)]), g.const(hi - lo)]))
    ring = _channel(g, masks, 0, 1)
    # Absolute pixel coordinates as (1, 1, 1, W) and (1, 1, H, 1) rows, so
    # that every moment below is a plain sum and sums of cells add up exactly.
    xs, ys = _coords(g, x, 3), _coords(g, x, 2)
    # Cell channels (see _M0 etc.): mass of ring and dots (6), ring^2 (1, for
    # purity), mass*x (6), mass*y (6), ring*(x^2+y^2) (1: the ring's spread
    # about its centroid, which tells one ring from two seen through one
    # window). Pooled part by part: concatenating full-resolution planes
    # costs more than the pooling itself.
    radial = g.op("Add", [g.op("Mul", [xs, xs]), g.op("Mul", [ys, ys])])  # (1, 1, H, W)
    parts = [masks, g.op("Mul", [ring, ring]), g.op("Mul", [masks, xs]), g.op("Mul", [masks, ys]),
             g.op("Mul", [ring, radial])]
    cells = g.op("Concat", [_sum_pool(g, p, STRIDES[0]) for p in parts], axis=1)  # (1, 20, h, w)

    scores, boxes, kpss = [], [], []
    for stride, k in zip(STRIDES, config.window_cells):
        if stride != STRIDES[0]:
            cells = _sum_pool(g, cells, 2)  # strides double: 2x2 cells make one
        s_out, b_out, k_out = _detector_head(g, cells, stride, k, config)
        scores.append(s_out)
        boxes.append(b_out)
        kpss.append(k_out)
    produced = scores + boxes + kpss
    # Give the outputs the real files' names.
    for tensor, name in zip(produced, DETECTOR_OUTPUTS):
        g.op("Identity", [tensor], out_names=[name])

    inputs = [helper.make_tensor_value_info(DETECTOR_INPUT, TensorProto.FLOAT, [1, 3, "?", "?"])]
    widths = [1] * 3 + [4] * 3 + [10] * 3
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"n{i}", w])
               for i, (name, w) in enumerate(zip(DETECTOR_OUTPUTS, widths))]
    graph = helper.make_graph(g.nodes, "tiny_scrfd", inputs, outputs, initializer=g.inits)
    return _model(graph)


# Channels of the cell tensors built above.
_M0, _DOT0, _M2, _MX, _DX0, _MY, _DY0, _MRR = 0, 1, 6, 7, 8, 13, 14, 19


def _detector_head(g: _Graph, cells: str, s: int, k: int,
                   config: TinyDetectorConfig) -> tuple[str, str, str]:
    """Score (N,1), boxes (N,4) and keypoints (N,10) for one stride."""
    # Sums over the (2k+1)^2 cells around each anchor: exact mass and moments.
    win = _box_sum(g, cells, k)
    # Ring mass in the band of cells just outside that window.
    ring_cells = _channel(g, cells, _M0, _M0 + 1)
    band = g.op("Sub", [_box_sum(g, ring_cells, k + config.band_cells),
                        _channel(g, win, _M0, _M0 + 1)])
    # Anchor points: the top-left pixel of each cell, as SCRFD decodes them.
    ax = g.op("Mul", [_coords(g, cells, 3), g.const(float(s))])
    ay = g.op("Mul", [_coords(g, cells, 2), g.const(float(s))])

    eps = g.const(1e-6)
    m0, m2, mxx, myy = (_channel(g, win, i, i + 1) for i in (_M0, _M2, _MX, _MY))
    den = g.op("Add", [m0, eps])
    cx = g.op("Div", [mxx, den])  # face centre, absolute pixels
    cy = g.op("Div", [myy, den])
    ox = g.op("Sub", [cx, ax])  # ... and relative to the anchor
    oy = g.op("Sub", [cy, ay])
    purity = g.clip01(g.op("Div", [m2, den]))
    area = g.op("Div", [g.op("Pow", [m0, g.const(2.0)]), g.op("Add", [m2, eps])])
    radius = g.op("Sqrt", [g.op("Div", [area, g.const(np.pi * (1 - RING_INNER**2))])])

    def ramp(value: str, offset: float, scale: float) -> str:
        # clip((value - offset) / scale, 0, 1)
        return g.clip01(g.op("Div", [g.op("Sub", [value, g.const(offset)]), g.const(scale)]))

    gate_mass = ramp(m0, config.min_ring_mass, config.min_ring_mass)
    # One ring of outer radius R spreads (1 + inner^2) / 2 * R^2 about its
    # centre (radial variance); two rings side by side spread far more.
    spread = g.op("Sub", [g.op("Div", [_channel(g, win, _MRR, _MRR + 1), den]),
                          g.op("Add", [g.op("Mul", [cx, cx]), g.op("Mul", [cy, cy])])])
    expected = g.op("Mul", [g.op("Div", [area, g.const(np.pi * (1 - RING_INNER**2))]),
                            g.const((1 + RING_INNER**2) / 2)])
    misfit = g.op("Abs", [g.op("Sub", [g.op("Div", [spread, g.op("Add", [expected, eps])]),
                                       g.const(1.0)])])
    gate_shape = ramp(g.op("Neg", [misfit]), -config.shape_tolerance * 2,
                      config.shape_tolerance)
    # Only the anchor nearest the centre fires (a 1 px soft edge; NMS merges ties).
    near_x = ramp(g.op("Neg", [g.op("Abs", [ox])]), -(s / 2 + 1), 1.0)
    near_y = ramp(g.op("Neg", [g.op("Abs", [oy])]), -(s / 2 + 1), 1.0)
    band_limit = g.op("Add", [g.op("Mul", [m0, g.const(config.band_tolerance)]), eps])
    gate_band = g.clip01(g.op("Sub", [g.const(1.0), g.op("Div", [band, band_limit])]))
    score = purity
    for gate in (gate_mass, near_x, near_y, gate_band, gate_shape):
        score = g.op("Mul", [score, gate])

    inv_s = g.const(1.0 / s)
    box = [g.op("Mul", [g.op(op, [radius, o]), inv_s])
           for op, o in (("Sub", ox), ("Sub", oy), ("Add", ox), ("Add", oy))]
    # Keypoints: each dot's centroid; with no dot in the window, fall back to
    # the template position from the ring so the output is always finite.
    lam = g.const(1e-3)
    kps = []
    for i in range(5):
        d0, dxx, dyy = (_channel(g, win, c + i, c + i + 1) for c in (_DOT0, _DX0, _DY0))
        d_den = g.op("Add", [d0, lam])
        for moment, centre, anchor, t in ((dxx, cx, ax, KP_TEMPLATE[i, 0]),
                                          (dyy, cy, ay, KP_TEMPLATE[i, 1])):
            prior = g.op("Add", [centre, g.op("Mul", [radius, g.const(float(t))])])
            num = g.op("Add", [moment, g.op("Mul", [prior, lam])])
            offset = g.op("Sub", [g.op("Div", [num, d_den]), anchor])
            kps.append(g.op("Mul", [offset, inv_s]))

    return (
        _anchor_rows(g, score, 1),
        _anchor_rows(g, g.op("Concat", box, axis=1), 4),
        _anchor_rows(g, g.op("Concat", kps, axis=1), 10),
    )


def _coords(g: _Graph, x: str, axis: int) -> str:
    """0, 1, 2, ... along ``axis`` (2 or 3) of an NCHW tensor, shaped to broadcast."""
    n = g.op("Gather", [g.op("Shape", [x]), g.const(axis, dtype=np.int64)], axis=0)
    seq = g.op("Range", [g.const(0, dtype=np.int64), n, g.const(1, dtype=np.int64)])
    shape = [1, 1, 1, -1] if axis == 3 else [1, 1, -1, 1]
    return g.op("Reshape", [g.op("Cast", [seq], to=TensorProto.FLOAT),
                            g.const(shape, dtype=np.int64)])


def _sum_pool(g: _Graph, x: str, size: int) -> str:
    """Sum over non-overlapping size x size blocks (floor of H/size, like SCRFD's grid)."""
    avg = g.op("AveragePool", [x], kernel_shape=[size, size], strides=[size, size])
    return g.op("Mul", [avg, g.const(float(size * size))])


def _box_sum(g: _Graph, x: str, k: int) -> str:
    """Sum over the (2k+1)^2 neighbourhood of each cell, zeros beyond the edge (separable)."""
    size = 2 * k + 1
    rows = g.op("AveragePool", [x], kernel_shape=[1, size], pads=[0, k, 0, k],
                count_include_pad=1)
    both = g.op("AveragePool", [rows], kernel_shape=[size, 1], pads=[k, 0, k, 0],
                count_include_pad=1)
    return g.op("Mul", [both, g.const(float(size * size))])


def _channel(g: _Graph, x: str, start: int, end: int) -> str:
    return g.op("Slice", [x, g.const([start], dtype=np.int64), g.const([end], dtype=np.int64),
                          g.const([1], dtype=np.int64)])


def _anchor_rows(g: _Graph, x: str, width: int) -> str:
    """(1, C, h, w) -> (h * w * 2, C): rows row-major over the grid, anchors innermost."""
    t = g.op("Transpose", [x], perm=[0, 2, 3, 1])  # (1, h, w, C)
    t = g.op("Unsqueeze", [t, g.const([3], dtype=np.int64)])  # (1, h, w, 1, C)
    t = g.op("Concat", [t] * NUM_ANCHORS, axis=3)  # (1, h, w, 2, C)
    return g.op("Reshape", [t, g.const([-1, width], dtype=np.int64)])


def build_tiny_recognizer(config: TinyRecognizerConfig = TinyRecognizerConfig()) -> onnx.ModelProto:
    """ArcFace-shaped recogniser: (N, 3, 112, 112) -> (N, 512).

    A fixed linear map of the pattern inside the ring: the aligned crop is
    masked to the area between the keypoint dots, pooled to 16x16 cells, each
    colour channel is centred across cells (so skin tone and brightness drop
    out, and contrast only scales the result), then randomly projected.
    """
    g = _Graph("rec")
    size = 112
    cell = size // config.grid
    mask = crop_pattern_mask(size)  # (112, 112) float32 in {0, 1}
    frac = mask.reshape(config.grid, cell, config.grid, cell).mean(axis=(1, 3))  # (8, 8)
    valid = frac > 0.3
    # Per channel: cell value = pool(x * mask) / frac, then subtract the mean
    # over valid cells. All linear, so fold it into one (3*64, dim) matrix.
    n = config.grid * config.grid
    per_channel = np.zeros((n, n), np.float32)
    idx = np.flatnonzero(valid.ravel())
    scale = np.zeros(n, np.float32)
    scale[idx] = 1.0 / frac.ravel()[idx]
    centring = np.eye(n, dtype=np.float32)[:, idx] - 1.0 / len(idx)  # (n, n_valid)
    per_channel[:, idx] = (np.diag(scale) @ centring)  # rows: input cell, cols: output cell
    rng = np.random.default_rng(config.seed)
    proj = rng.standard_normal((3 * n, config.embedding_dim)).astype(np.float32)
    folded = np.zeros((3 * n, config.embedding_dim), np.float32)
    for c in range(3):
        folded[c * n:(c + 1) * n] = per_channel @ proj[c * n:(c + 1) * n]
    folded *= config.norm_scale / (0.25 * np.sqrt(3 * len(idx) * config.embedding_dim))

    x = RECOGNIZER_INPUT
    masked = g.op("Mul", [x, g.const(mask[None, None])], hint="mask")
    pooled = g.op("AveragePool", [masked], kernel_shape=[cell, cell], strides=[cell, cell])
    flat = g.op("Flatten", [pooled], axis=1)  # (N, 192), channel-major like `folded`
    g.op("MatMul", [flat, g.const(folded)], out_names=[RECOGNIZER_OUTPUT])

    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["None", 3, size, size])]
    outputs = [helper.make_tensor_value_info(RECOGNIZER_OUTPUT, TensorProto.FLOAT,
                                             ["None", config.embedding_dim])]
    graph = helper.make_graph(g.nodes, "tiny_arcface", inputs, outputs, initializer=g.inits)
    return _model(graph)
