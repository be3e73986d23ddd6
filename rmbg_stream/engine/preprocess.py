"""Resizing frames to and from the network, on the device, and the sizes the network takes.

BiRefNet's input sides must be multiples of 32 (five halvings down to its deepest feature, and the decoder
cuts the image into a 32 x 32 grid of tiles at that level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize; antialiased when shrinking, like the PIL resize of BRIA's example."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


MULTIPLE = 32


def check_size(size: tuple[int, int]) -> None:
    """`size` (h, w): raises ValueError unless both sides are positive multiples of 32."""
    h, w = size
    if h <= 0 or w <= 0 or h % MULTIPLE or w % MULTIPLE:
        raise ValueError(f"network input size must be multiples of {MULTIPLE} on both sides, got {w}x{h} (WxH); "
                         f"try {_round(w)}x{_round(h)}")


def fit_aspect(h: int, w: int, side: int) -> tuple[int, int]:
    """(h, w) with an h x w frame's aspect, the long side `side`, both sides rounded to multiples of 32
    (at least 32): 1080x1920 at 1024 -> (576, 1024)."""
    scale = side / max(h, w)
    return _round(h * scale), _round(w * scale)


def _round(v: float) -> int:
    return max(MULTIPLE, round(v / MULTIPLE) * MULTIPLE)
