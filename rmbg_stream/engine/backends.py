"""Matting backends: a batch of RGB frames at the backend's resolution in, alpha out.

Contract: ``backend(x)`` takes float (B,3,h,w) in 0..1 on ``backend.device`` and returns float32
(B,1,h,w) in 0..1. ``resolution`` is the (h, w) the frames must be resized to, or None when the
backend works at any size (chroma key).
"""

from __future__ import annotations

import logging

import torch

from ..device import pick_dtype
from ..models import BiRefNet
from .composite import parse_background

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BiRefNetBackend:
    def __init__(self, model: BiRefNet, resolution: tuple[int, int], device: torch.device, dtype: torch.dtype,
                 name: str = "birefnet"):
        if resolution[0] % 32 or resolution[1] % 32:
            raise ValueError(f"model resolution must be a multiple of 32, got {resolution[0]}x{resolution[1]}")
        torch.set_float32_matmul_precision("high")
        self.name = name
        self.resolution = tuple(resolution)
        self.device = device
        self.dtype = dtype
        self.model = model.eval().to(device=device, dtype=dtype)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

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
                   resolution: tuple[int, int] | None = None, *, patch_order: str | None = None):
    """`name`: ``chroma`` or ``chroma:<colour>``; ``random:<backbone>`` (untrained, for benchmarks and
    tests); otherwise a BiRefNet checkpoint: hub id, alias, snapshot folder or weights file."""
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

    model, info = load_birefnet(name, patch_order=patch_order)
    return BiRefNetBackend(model, resolution or info.resolution, device, dtype, name)
