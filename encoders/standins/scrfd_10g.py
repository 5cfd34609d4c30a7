"""SCRFD-10G's architecture, for a full-size stand-in face detector.

The network of insightface's ``scrfd_10g_bnkps`` (detection/scrfd/configs/scrfd/
scrfd_10g_bnkps.py), the detector of buffalo_l's ``det_10g.onnx`` and of
antelopev2's ``scrfd_10g_bnkps.onnx``:

- backbone ResNetV1e: a deep stem (three 3x3 convs, 3 -> 28 -> 28 -> 56, the
  first with stride 2) and a 2x2 max pool, then BasicBlock stages of 3/4/2/3
  blocks at 56, 88, 88 and 224 channels (strides 1, 2, 2, 2; stride-2
  shortcuts average-pool, then a 1x1 conv);
- neck PAFPN on the last three stages (strides 8, 16, 32) at 56 channels:
  1x1 laterals, a top-down path with nearest upsampling, 3x3 output convs, a
  bottom-up path of stride-2 3x3 convs and 3x3 convs after it;
- head, one per stride (not shared): three 3x3 conv-BN-ReLU at 80 channels
  shared by classification and regression, then 3x3 convs to 2 anchors x
  (1 score, 4 box distances, 10 keypoint coordinates).

About 10 GFLOPs (multiply-adds) at 640x480, as the SCRFD paper counts it. The
outputs are what insightface's SCRFD class expects of the real file: nine
tensors named as in det_10g.onnx, scores (sigmoid), boxes and keypoints for
strides 8, 16 and 32, each (H/s * W/s * 2, C).

It is here to export **random weights** for benches: what a real detector
costs per photo. Its score convs are set so that it reports no face on any
input (a random detector would report thousands of boxes and time NMS
instead of the network). It detects nothing. Needs torch (the ``ml`` extra).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from encoders.standins.face_pack import DETECTOR_INPUT, DETECTOR_OUTPUTS

STRIDES = (8, 16, 32)
ANCHORS = 2  # per cell: scales 1 and 2 of each stride's base size


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                               nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU (mmdet's BasicBlock)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(cin, cout, stride),
                                  _conv_bn_relu(cout, cout, relu=False))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            # ResNetV1e's avg_down: pool first, then a stride-1 1x1 conv.
            pool = (nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
                    if stride != 1 else nn.Identity())
            self.shortcut = nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class SCRFD10G(nn.Module):
    """(1, 3, H, W) -> 9 tensors: scores, boxes, keypoints for strides 8, 16, 32."""

    def __init__(self, blocks: tuple[int, ...] = (3, 4, 2, 3),
                 planes: tuple[int, ...] = (56, 88, 88, 224), neck: int = 56,
                 head: int = 80, head_convs: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn_relu(3, 28, 2), _conv_bn_relu(28, 28),
                                  _conv_bn_relu(28, 56), nn.MaxPool2d(2, 2))
        stages, cin = [], 56
        for i, (n, cout) in enumerate(zip(blocks, planes)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[BasicBlock(cin if b == 0 else cout, cout,
                                                     stride if b == 0 else 1)
                                          for b in range(n)]))
            cin = cout
        self.stages = nn.ModuleList(stages)
        used = planes[1:]  # PAFPN start_level=1: strides 8, 16, 32
        self.lateral = nn.ModuleList(nn.Conv2d(c, neck, 1) for c in used)
        self.fpn = nn.ModuleList(nn.Conv2d(neck, neck, 3, 1, 1) for _ in used)
        self.down = nn.ModuleList(nn.Conv2d(neck, neck, 3, 2, 1) for _ in used[1:])
        self.pafpn = nn.ModuleList(nn.Conv2d(neck, neck, 3, 1, 1) for _ in used[1:])
        self.towers = nn.ModuleList(
            nn.Sequential(*[_conv_bn_relu(neck if k == 0 else head, head)
                            for k in range(head_convs)]) for _ in STRIDES)
        self.cls = nn.ModuleList(nn.Conv2d(head, ANCHORS, 3, 1, 1) for _ in STRIDES)
        self.reg = nn.ModuleList(nn.Conv2d(head, ANCHORS * 4, 3, 1, 1) for _ in STRIDES)
        self.kps = nn.ModuleList(nn.Conv2d(head, ANCHORS * 10, 3, 1, 1) for _ in STRIDES)
        with torch.no_grad():
            for conv in self.cls:  # no face anywhere: sigmoid(-20) ~ 2e-9
                conv.weight.zero_()
                conv.bias.fill_(-20.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        lat = [conv(f) for conv, f in zip(self.lateral, feats[1:])]
        for i in range(len(lat) - 1, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:],
                                                    mode="nearest")
        inter = [conv(t) for conv, t in zip(self.fpn, lat)]
        for i in range(len(inter) - 1):  # bottom-up
            inter[i + 1] = inter[i + 1] + self.down[i](inter[i])
        outs = [inter[0]] + [conv(t) for conv, t in zip(self.pafpn, inter[1:])]
        scores, boxes, points = [], [], []
        for i, feat in enumerate(outs):
            t = self.towers[i](feat)
            scores.append(_flat(self.cls[i](t).sigmoid(), 1))
            boxes.append(_flat(self.reg[i](t), 4))
            points.append(_flat(self.kps[i](t), 10))
        return (*scores, *boxes, *points)


def _flat(t: torch.Tensor, width: int) -> torch.Tensor:
    # (1, A*C, H, W) -> (H*W*A, C): rows row-major over cells, anchors innermost.
    return t.permute(0, 2, 3, 1).reshape(-1, width)


def conv_macs(model: nn.Module, height: int = 480, width: int = 640) -> int:
    """Multiply-adds of the model's convolutions on one (height, width) image.

    Counted on a copy on the meta device: shapes only, no arithmetic.
    """
    model = copy.deepcopy(model).to("meta")
    total = 0

    def count(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += output.numel() * k

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, height, width, device="meta"))
    for hook in hooks:
        hook.remove()
    return total


def export_random_scrfd_10g(path: Path, seed: int = 0) -> Path:
    """Export SCRFD-10G with random weights as ``path``, in det_10g.onnx's interface.

    Input ``input.1`` (1, 3, ?, ?); outputs named as det_10g's. ~5 s, ~17 MB.
    """
    torch.manual_seed(seed)
    model = SCRFD10G().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"out{i}" for i in range(len(DETECTOR_OUTPUTS))]  # renamed below
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one,
        # which needs onnxscript (not a dependency); it still works and says so.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 3, 640, 640),), str(path),
            input_names=[DETECTOR_INPUT], output_names=names,
            dynamic_axes={DETECTOR_INPUT: {2: "?", 3: "?"}, **{n: {0: f"n{i}"}
                                                               for i, n in enumerate(names)}},
            opset_version=17, dynamo=False,
        )
    graph = onnx.load(str(path))
    rename = dict(zip(names, DETECTOR_OUTPUTS))
    for node in graph.graph.node:
        node.output[:] = [rename.get(o, o) for o in node.output]
    for out in graph.graph.output:
        out.name = rename.get(out.name, out.name)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    return path
