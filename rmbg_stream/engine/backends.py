"""Matting backends: a batch of RGB frames at the backend's resolution in, alpha out.

Contract (``Backend``): ``backend(x)`` takes float (B,3,h,w) in 0..1 on ``backend.device`` and returns
float32 (B,1,h,w) in 0..1. ``input_size(H, W)`` is the (h, w) an H x W frame must be resized to, or None
when the backend works at any size (chroma key); ``resolution`` is the nominal (h, w), or None likewise.
A fixed-size model maps every frame to ``resolution``; a dynamic one (``BiRefNet_dynamic``) keeps the
frame's aspect, at ``resolution``'s long side rounded to multiples of 32 (1920x1080 -> 1024x576).
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from ..device import pick_dtype
from ..models import BiRefNet
from .composite import parse_background
from .preprocess import check_size, fit_aspect

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backend(Protocol):
    name: str
    device: torch.device
    dtype: torch.dtype
    resolution: tuple[int, int] | None

    def input_size(self, h: int, w: int) -> tuple[int, int] | None: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class BiRefNetBackend:
    """`resolution` (h, w), multiples of 32; `aspect`: the model takes any such size (see the module docstring)."""

    def __init__(self, model: BiRefNet, resolution: tuple[int, int], device: torch.device, dtype: torch.dtype,
                 name: str = "birefnet", aspect: bool = False):
        check_size(resolution)
        torch.set_float32_matmul_precision("high")
        self.name = name
        self.resolution = tuple(resolution)
        self.aspect = aspect
        self.device = device
        self.dtype = dtype
        self.model = model.eval().to(device=device, dtype=dtype)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        return fit_aspect(h, w, max(self.resolution)) if self.aspect else self.resolution

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x - self.mean) / self.std).to(self.dtype)
        return self.model(x)[-1].float().sigmoid_()


class ChromaBackend:
    """Green/blue-screen keying by distance in the CbCr plane: no network, deterministic."""

    def __init__(self, device: torch.device, key=(0, 177, 64), tolerance: float = 0.12, softness: float = 0.08):
        self.name = "chroma"
        self.resolution = None
        self.guided = False  # see Engine._upsample
        self.device = device
        self.dtype = torch.float32
        # RGB -> (Cb, Cr) as a 1x1 convolution whose bias subtracts the key: one pass over the frame.
        m = torch.tensor([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], device=device)
        self.weight = m.view(2, 3, 1, 1)
        self.bias = -(m @ (torch.tensor(key, dtype=torch.float32, device=device) / 255))
        self.key = tuple(key)
        self.tolerance = tolerance
        self.softness = softness

    def input_size(self, h: int, w: int) -> None:
        return None

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        d = torch.nn.functional.conv2d(x, self.weight, self.bias)
        return self._soft(d)

    @torch.inference_mode()
    def key_chroma(self, uv: torch.Tensor, spec) -> torch.Tensor:
        """The same key straight from 4:2:0 chroma planes (B,2,h,w) (code values / 255 in `spec`'s range):
        YUV streams skip the round trip through RGB."""
        _, ku, kv = spec.color(self.key)
        scale = 1.0 if spec.full_range else 255 / 224  # chroma codes -> the full-range Cb/Cr the key uses
        d = torch.cat([uv[:, :1] - ku / 255, uv[:, 1:] - kv / 255], 1).mul_(scale)
        return self._soft(d)

    def _soft(self, cbcr: torch.Tensor) -> torch.Tensor:
        dist = cbcr.square_().sum(1, keepdim=True).sqrt_()
        return dist.sub_(self.tolerance).div_(self.softness).clamp_(0, 1)


def create_backend(name: str, device: torch.device, precision: str = "auto",
                   resolution: tuple[int, int] | None = None) -> Backend:
    """`name`: ``chroma`` or ``chroma:<colour>``; ``random:<backbone>`` (untrained, for benchmarks and
    tests); otherwise a BiRefNet checkpoint: hub id, alias, snapshot folder or weights file.
    `resolution` (h, w) overrides the model's own; a dynamic model given a square one keeps each frame's
    aspect at that long side, a non-square one is taken as is."""
    if resolution is not None:
        check_size(resolution)
    if name == "chroma" or name.startswith("chroma:"):
        if ":" not in name:
            return ChromaBackend(device)
        key = parse_background(name.split(":", 1)[1])
        if key.kind != "color":
            raise ValueError(f"chroma key must be a colour (#rrggbb or a name), got {name!r}")
        return ChromaBackend(device, key.color)
    dtype = pick_dtype(precision, device)
    if name.startswith("random:"):
        backbone = name.split(":", 1)[1]
        log.warning("random weights for %s: output masks are meaningless (benchmarks and tests only)", backbone)
        return BiRefNetBackend(BiRefNet(backbone), resolution or (1024, 1024), device, dtype, name)
    from ..models.weights import load_birefnet

    model, info = load_birefnet(name)
    dynamic = info.spec is not None and info.spec.dynamic
    aspect = dynamic and (resolution is None or resolution[0] == resolution[1])
    return BiRefNetBackend(model, resolution or info.resolution, device, dtype, name, aspect)
