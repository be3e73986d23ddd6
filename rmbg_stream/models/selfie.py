"""MediaPipe's selfie segmenter (Apache-2.0) as our own PyTorch network, its weights read from the original file.

The two ``.tflite`` files in ``data/`` come unchanged from the ``mediapipe==0.10.14`` wheel
(``mediapipe/modules/selfie_segmentation/``), with its licence (``data/LICENSE.mediapipe``, ``data/NOTICE``).
Nothing of MediaPipe runs: `SelfieNet` is the architecture written out in PyTorch, and `load_selfie` reads the
file's flatbuffer (the `tflite` schema package) for the weights and for what the network takes and gives:

- input: the graph's input tensor, float32 (1,H,W,3) NHWC RGB, H x W the network's resolution (256x256, or
  144x256 for the landscape model); its range from the file's metadata (TFLite ``NormalizationOptions``,
  mean 0 and std 255 of 0..255 pixels: 0..1). We feed it NCHW, which our convolutions expect.
- output: (1,H,W,1); a final LOGISTIC op means it is already a probability (no sigmoid on top).

The network is a MobileNetV3-like encoder (stride 2 stem, eight inverted-residual blocks, squeeze-excite), an
LR-ASPP-like head at 1/16 and three decoder stages back to 1/2, each fusing an encoder skip through a gate, then
a 2x2 stride-2 transposed convolution to full size. Its weighted layers are matched to the file's weighted ops in
execution order, by kind, shape, stride and padding, so a file of another architecture is refused in one line.
TFLite's SAME padding puts the odd pixel at the bottom/right on stride 2, which PyTorch's symmetric padding does
not: `Conv` pads explicitly. Convolution weights are stored as fp16 behind DEQUANTIZE ops: read as float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .contract import NetworkIO
from .weights import WeightsError

DATA = Path(__file__).with_name("data")


@dataclass(frozen=True)
class SelfieSpec:
    name: str
    file: str
    description: str

    @property
    def path(self) -> Path:
        return DATA / self.file


# fmt: off
SELFIE_MODELS: dict[str, SelfieSpec] = {s.name: s for s in (
    SelfieSpec("selfie", "selfie_segmentation.tflite",
               "MediaPipe selfie segmenter, 256x256: people, real time on a CPU (bundled, Apache-2.0)"),
    SelfieSpec("selfie-landscape", "selfie_segmentation_landscape.tflite",
               "MediaPipe selfie segmenter, 256x144 for 16:9 frames (bundled, Apache-2.0)"),
)}
# fmt: on

# Encoder blocks: (in, expanded, out, kernel, stride, activation, squeeze-excite channels or 0).
BLOCKS = (
    (16, 16, 16, 3, 2, "relu", 8),
    (16, 72, 24, 3, 2, "relu", 0),
    (24, 88, 24, 3, 1, "relu", 0),
    (24, 96, 32, 5, 2, "hardswish", 24),
    (32, 128, 32, 5, 1, "hardswish", 32),
    (32, 128, 32, 5, 1, "hardswish", 32),
    (32, 96, 32, 5, 1, "hardswish", 24),
    (32, 96, 32, 5, 1, "hardswish", 24),
)
SKIPS = (0, 1, 3)  # the decoder's skips: the stem's output (1/2) and blocks 1 (1/4) and 3 (1/8), 1-based
HEAD = 128  # channels of the head at 1/16
DECODER = ((HEAD, 24), (24, 16), (16, 16))  # (in, out = the skip's channels), from 1/16 up to 1/2
ACTIVATIONS = {"relu": F.relu, "hardswish": F.hardswish}


def lookup_selfie(name: str) -> SelfieSpec | None:
    return SELFIE_MODELS.get(name.strip().lower())


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TFLite SAME padding along one axis: (before, after), the extra pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv(nn.Conv2d):
    """A convolution with TFLite's SAME padding (see the module docstring); `groups=channels` is depthwise."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (k, _), (s, _) = self.kernel_size, self.stride
        top, bottom = same_padding(x.shape[-2], k, s)
        left, right = same_padding(x.shape[-1], k, s)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class Gate(nn.Module):
    """Channel weights (B,C,1,1) in 0..1 from a global mean: 1x1 reduce, ReLU, 1x1 expand, sigmoid."""

    def __init__(self, channels: int, mid: int):
        super().__init__()
        self.reduce = Conv(channels, mid)
        self.expand = Conv(mid, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))).sigmoid()


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, kernel: int, stride: int, act: str, squeeze: int):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.expand = Conv(cin, mid)
        self.depthwise = Conv(mid, mid, kernel, stride, groups=mid)
        self.gate = Gate(mid, squeeze) if squeeze else None
        self.project = Conv(mid, cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.depthwise(self.act(self.expand(x))))
        if self.gate is not None:
            y = y * self.gate(y)
        y = self.project(y)
        return x + y if self.residual else y


class Head(nn.Module):
    """relu(1x1 conv) weighted by a sigmoid of a 1x1 conv of the global mean (LR-ASPP)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.main = Conv(cin, cout)
        self.gate = Conv(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.main(x)) * self.gate(x.mean((2, 3), keepdim=True)).sigmoid()


class DecoderStage(nn.Module):
    """2x up, project to the skip's channels, fuse the gated skip, then a 1x1 and a residual 3x3 depthwise."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.project = Conv(cin, cout)
        self.gate = Gate(cout, cout)
        self.refine = Conv(cout, cout)
        self.depthwise = Conv(cout, cout, 3, groups=cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # RESIZE_BILINEAR with half_pixel_centers (checked at load) is align_corners=False.
        up = self.project(F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False))
        y = skip * self.gate(skip + up) + up
        y = F.relu(self.refine(y))
        return y + F.relu(self.depthwise(y))


class SelfieNet(nn.Module):
    """RGB (B,3,H,W) float in the network's input range (0..1 for MediaPipe's files) -> [alpha (B,1,H,W)], a list
    like BiRefNet's outputs (the final map last). `sigmoid`: the graph ends in LOGISTIC (the output is a
    probability); else the output is logits. H and W must be multiples of 16."""

    def __init__(self, sigmoid: bool = True):
        super().__init__()
        self.stem = Conv(3, 16, 3, 2)
        self.blocks = nn.ModuleList(InvertedResidual(*b) for b in BLOCKS)
        self.head = Head(BLOCKS[-1][2], HEAD)
        self.decoder = nn.ModuleList(DecoderStage(cin, cout) for cin, cout in DECODER)
        self.final = nn.ConvTranspose2d(DECODER[-1][1], 1, 2, stride=2)
        self.sigmoid = sigmoid

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.hardswish(self.stem(x))
        skips = [x]
        for block in self.blocks:
            x = block(x)
            skips.append(x)
        x = self.head(x)
        for stage, k in zip(self.decoder, reversed(SKIPS)):
            x = stage(x, skips[k])
        x = self.final(x)
        return [x.sigmoid() if self.sigmoid else x]

    def layers(self) -> list[nn.Module]:
        """The weighted layers in execution order (registration order, which the constructor keeps so)."""
        return [m for m in self.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]


@dataclass(frozen=True)
class SelfieInfo:
    source: str
    path: Path
    resolution: tuple[int, int]  # (h, w), from the graph's input tensor
    io: NetworkIO
    description: str = ""


def load_selfie(source: str) -> tuple[SelfieNet, SelfieInfo]:
    """`source`: ``selfie``, ``selfie-landscape`` or a path to a ``.tflite`` file of this architecture ->
    (SelfieNet in eval mode, float32, CPU; its `SelfieInfo`). `WeightsError` in one line for anything else."""
    spec = lookup_selfie(source)
    path = spec.path if spec else Path(source)
    if not path.is_file():
        raise WeightsError(f"selfie model file {path} not found" + (" (the package is incomplete: reinstall it)"
                                                                     if spec else ""))
    from .tflite_graph import read_graph

    graph = read_graph(path)
    net = SelfieNet(sigmoid=graph.output == "probability")
    load_layers(net, graph, path)
    info = SelfieInfo(source, path, graph.resolution, NetworkIO(graph.input_range, graph.output),
                      spec.description if spec else "")
    return net.eval(), info


def load_layers(net: SelfieNet, graph, path: Path) -> None:
    """Copies `graph.layers` (tflite_graph.Layer, execution order) into `net.layers()`, checking each one."""
    ours = net.layers()
    if len(graph.layers) != len(ours):
        raise WeightsError(f"{path} has {len(graph.layers)} weighted layers where the selfie network has "
                           f"{len(ours)}: it is not MediaPipe's selfie segmenter")
    for i, (layer, module) in enumerate(zip(graph.layers, ours)):
        weight, bias = torch_weights(layer, module)
        if weight.shape != module.weight.shape or bias.shape != module.bias.shape:
            raise WeightsError(f"{path}: layer {i} ({layer.name}) has weights {tuple(weight.shape)} where the "
                               f"selfie network has {tuple(module.weight.shape)}: not MediaPipe's selfie segmenter")
        if layer.stride != module.stride[0] or not (layer.padding_same or module.kernel_size[0] == 1):
            raise WeightsError(f"{path}: layer {i} ({layer.name}) has stride {layer.stride}, "
                               f"{'SAME' if layer.padding_same else 'VALID'} padding, unlike the selfie network")
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)


def torch_weights(layer, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's TFLite weights in PyTorch's layout: conv OHWI -> OIHW, depthwise 1HWC -> C1HW, transposed
    conv OHWI -> IOHW."""
    w = torch.from_numpy(np.ascontiguousarray(layer.weight, dtype=np.float32))
    kind = {"conv": (0, 3, 1, 2), "depthwise": (3, 0, 1, 2), "transposed": (3, 0, 1, 2)}[layer.kind]
    expected = "transposed" if isinstance(module, nn.ConvTranspose2d) else (
        "depthwise" if module.groups > 1 else "conv")
    if layer.kind != expected:
        raise WeightsError(f"layer {layer.name} is a {layer.kind} op where the selfie network has a {expected} one: "
                           "not MediaPipe's selfie segmenter")
    return w.permute(*kind).contiguous(), torch.from_numpy(np.asarray(layer.bias, dtype=np.float32).copy())
