"""ArcFace's IResNet-50 backbone, for full-size stand-in recognisers.

The architecture of insightface's ``iresnet50`` (recognition/arcface_torch,
the backbone of buffalo_l's ``w600k_r50.onnx``): 112x112 input, improved
residual blocks (BN-conv-BN-PReLU-conv-BN), stages of 3/4/14/3 blocks at 64,
128, 256 and 512 channels each starting with stride 2, then BN, a fully
connected layer from 512x7x7 to 512 and a final BatchNorm1d: ~43.6M
parameters. It is here to export a model with **random weights** to ONNX so
that tests and benches can run a recogniser of the real size and interface
through the same loading code as a real pack. It recognises nobody.

Needs torch (the ``ml`` extra); nothing else in ``encoders`` imports this.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

# The real w600k_r50.onnx's tensor names, so name-based callers work on the stand-in.
INPUT_NAME = "input.1"
OUTPUT_NAME = "683"


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = self.downsample(x) if self.downsample is not None else x
        return out + identity


class IResNet(nn.Module):
    """insightface's IResNet; ``layers=(3, 4, 14, 3)`` is iresnet50."""

    fc_scale = 7 * 7  # spatial size after four stride-2 stages on 112 px

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 14, 3),
                 num_features: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0], stride=2)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes, eps=1e-5),
            )
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, 3, 112, 112) -> (N, 512)
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 512, 7, 7)
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


def iresnet50(num_features: int = 512) -> IResNet:
    return IResNet((3, 4, 14, 3), num_features=num_features)


def export_random_arcface_r50(path: Path, seed: int = 0) -> Path:
    """Export an iresnet50 with random weights as ``path``, in w600k_r50's interface.

    Input ``input.1`` (N, 3, 112, 112) with a dynamic batch, output ``683``
    (N, 512). Takes ~10-30 s on two CPU cores and writes ~175 MB.
    """
    torch.manual_seed(seed)
    model = iresnet50().eval()  # default init: outputs stay small and finite
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_output = "embedding"  # dynamo=False rejects purely numeric names; renamed below
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one,
        # which needs onnxscript (not a dependency); it still works and says so.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 3, 112, 112),), str(path),
            input_names=[INPUT_NAME], output_names=[tmp_output],
            dynamic_axes={INPUT_NAME: {0: "None"}, tmp_output: {0: "None"}},
            opset_version=17, dynamo=False,
        )
    graph_model = onnx.load(str(path))
    for node in graph_model.graph.node:
        node.output[:] = [OUTPUT_NAME if o == tmp_output else o for o in node.output]
    for out in graph_model.graph.output:
        if out.name == tmp_output:
            out.name = OUTPUT_NAME
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))
    return path


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
