"""Frames into floats, resizing them to and from the network, on the device, and the sizes the network takes.

BiRefNet's input sides must be multiples of 32 (five halvings down to its deepest feature, and the decoder
cuts the image into a 32 x 32 grid of tiles at that level).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .filters import resize_bilinear

# The most one antialiased interpolate shrinks a side by. CUDA's antialiased bilinear kernel keeps each output
# pixel's weights in shared memory and refuses at about 30x ("Too much shared memory required"); a huge background
# image onto a small frame, or a 4K frame into a 256 network input, gets there.
MAX_SHRINK = 8


def to_float(hwc: torch.Tensor) -> torch.Tensor:
    """uint8 H x W x 3 -> float (1,3,H,W) in 0..1, contiguous: ops that broadcast an alpha or a colour over a
    channels-last view of the frame run ~10x slower on the CPU."""
    if hwc.device.type != "cpu" or hwc.dim() != 3 or hwc.shape[2] != 3 or hwc.numel() == 0:
        return hwc.permute(2, 0, 1).unsqueeze(0).contiguous().float().mul_(1 / 255)
    # On the CPU torch's uint8 channel split (the permuted copy) is the slow part: ~3.4 ms at 640x480, against
    # ~0.15 ms in OpenCV; the float conversion of the planar copy is then one fast pass (~0.3 ms), the same values.
    planes = np.stack(cv2.split(np.ascontiguousarray(hwc.numpy())))
    return torch.from_numpy(planes).unsqueeze(0).float().mul_(1 / 255)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (..., h, w) to `size`; antialiased when shrinking, like the PIL resize of BRIA's example,
    in steps of at most MAX_SHRINK (`shrink_plan`): one step, as before, for any shrink up to that."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if size[0] >= x.shape[-2] and size[1] >= x.shape[-1]:
        return resize_bilinear(x, size)
    for step in shrink_plan(tuple(x.shape[-2:]), tuple(size)):
        x = F.interpolate(x, size=step, mode="bilinear", align_corners=False, antialias=True)
    return x


def shrink_plan(src: tuple[int, int], dst: tuple[int, int], bound: int = MAX_SHRINK) -> list[tuple[int, int]]:
    """The sizes (h, w) a resize from `src` to `dst` passes through, `dst` last, each side shrinking by at most
    `bound` a step: from `dst` up by factors of `bound` until the source is within reach (20000 -> 3904 -> 488 ->
    61). A side that needs fewer steps keeps its source size until its own. Each step is antialiased, so the
    intermediate sizes keep the result close to one exact resize (the first steps blur by a fraction of a final
    pixel)."""
    sides = []
    for s, d in zip(src, dst):
        steps = [d]
        while s > steps[-1] * bound:
            steps.append(steps[-1] * bound)
        sides.append(steps)
    n = max(len(steps) for steps in sides)
    sides = [steps + [s] * (n - len(steps)) for steps, s in zip(sides, src)]
    return [(sides[0][i], sides[1][i]) for i in reversed(range(n))]


MULTIPLE = 32


def check_size(size: tuple[int, int], multiple: int = MULTIPLE) -> None:
    """`size` (h, w): raises ValueError unless both sides are positive multiples of `multiple` (BiRefNet's 32)."""
    h, w = size
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        raise ValueError(f"network input size must be multiples of {multiple} on both sides, got {w}x{h} (WxH); "
                         f"try {_round(w)}x{_round(h)}")


def fit_aspect(h: int, w: int, side: int) -> tuple[int, int]:
    """(h, w) with an h x w frame's aspect, the long side `side`, both sides rounded to multiples of 32
    (at least 32): 1080x1920 at 1024 -> (576, 1024)."""
    scale = side / max(h, w)
    return _round(h * scale), _round(w * scale)


def _round(v: float) -> int:
    return max(MULTIPLE, round(v / MULTIPLE) * MULTIPLE)
