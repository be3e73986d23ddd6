"""Decoder building blocks of BiRefNet's general configuration (names follow the checkpoints)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# torchvision.ops.deform_conv2d, imported when the first DeformableConv2d is built: importing torchvision takes
# 1.5-2 s, which the chroma keyer (and a cluster worker that runs it) would pay for nothing.
deform_conv2d = None

# torchvision before 0.29.0 launches deform_conv2d on the legacy default stream (pytorch/vision#9513): unordered
# against the engine's compute stream, it would corrupt masks without an error. pyproject's floor keeps it out;
# this catches an install that bypassed it (--no-deps, a pinned environment).
FIRST_STREAM_SAFE = (0, 29)


def check_deform_stream(device: torch.device, version: str | None = None) -> None:
    """Refuses CUDA with a torchvision whose deform_conv2d ignores the current stream (one line, ValueError)."""
    if version is None:
        import torchvision

        version = torchvision.__version__
    major_minor = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    if device.type == "cuda" and major_minor < FIRST_STREAM_SAFE:
        raise ValueError(f"torchvision {version} runs deformable convolutions on the wrong CUDA stream, which "
                         "corrupts masks: install torchvision>=0.29.0")


class DeformableConv2d(nn.Module):
    """Modulated deformable convolution (DCNv2): offsets and a 0..2 modulator predicted from the input."""

    def __init__(self, cin: int, cout: int, k: int, padding: int):
        global deform_conv2d
        super().__init__()
        if deform_conv2d is None:
            from torchvision.ops import deform_conv2d
        self.padding = padding
        self.offset_conv = nn.Conv2d(cin, 2 * k * k, k, 1, padding)
        self.modulator_conv = nn.Conv2d(cin, k * k, k, 1, padding)
        self.regular_conv = nn.Conv2d(cin, cout, k, 1, padding, bias=False)
        for conv in (self.offset_conv, self.modulator_conv):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.offset_conv(x)
        mask = 2.0 * torch.sigmoid(self.modulator_conv(x))
        if x.dtype == torch.bfloat16:
            # torchvision's kernels have no bfloat16 variant.
            out = deform_conv2d(x.float(), offset.float(), self.regular_conv.weight.float(), None,
                                padding=self.padding, mask=mask.float())
            return out.to(x.dtype)
        return deform_conv2d(x, offset, self.regular_conv.weight, None, padding=self.padding, mask=mask)


class DeformBranch(nn.Module):
    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.atrous_conv = DeformableConv2d(cin, cout, k, k // 2)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.atrous_conv(x)))


class ASPPDeformable(nn.Module):
    def __init__(self, cin: int, kernel_sizes=(1, 3, 7), inner: int = 256):
        super().__init__()
        self.aspp1 = DeformBranch(cin, inner, 1)
        self.aspp_deforms = nn.ModuleList(DeformBranch(cin, inner, k) for k in kernel_sizes)
        self.global_avg_pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(inner * (2 + len(kernel_sizes)), cin, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.aspp1(x), *(b(x) for b in self.aspp_deforms)]
        # Bilinear upsampling of a 1x1 map is a broadcast.
        branches.append(self.global_avg_pool(x).expand_as(branches[0]))
        return F.relu(self.bn1(self.conv1(torch.cat(branches, 1))))


class BasicDecBlk(nn.Module):
    def __init__(self, cin: int, cout: int, inner: int = 64):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, inner, 3, 1, 1)
        self.dec_att = ASPPDeformable(inner)
        self.conv_out = nn.Conv2d(inner, cout, 3, 1, 1)
        self.bn_in = nn.BatchNorm2d(inner)
        self.bn_out = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = F.relu(self.bn_in(self.conv_in(x)))
        return self.bn_out(self.conv_out(self.dec_att(x)))


class SimpleConvs(nn.Module):
    def __init__(self, cin: int, cout: int, inner: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, inner, 3, 1, 1)
        self.conv_out = nn.Conv2d(inner, cout, 3, 1, 1)

    def forward(self, x):
        return self.conv_out(self.conv1(x))


class BasicLatBlk(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv(x)


def gradient_gate(cin: int, mid: int = 16) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, mid, 3, 1, 1), nn.BatchNorm2d(mid), nn.ReLU())


def head(cin: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, 1, 1))
