"""Frame <-> tensor conversions around the network, done on the device."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(frames: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Equal-sized uint8 HxWx3 RGB arrays -> float (B,3,H,W) in 0..1 on `device`."""
    x = torch.from_numpy(np.stack(frames)).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).float().div_(255)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize; antialiased when shrinking, like the PIL resize of BRIA's example."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
