"""How good a sequence of masks is without a ground truth: flicker where the picture is still, lag behind the raw
masks where it moves, and how well an upsampled edge follows the picture's. Used by scripts/quality_real.py and
by the tests that replay real masks (tests/data/real_*.npz).

Sequences are (T,1,h,w) float tensors, alpha and grey picture in 0..1, at one size (the mask's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .filters import box_blur, max_filter
from .smoothing import grey

# A pixel's picture "barely changed" when its blurred |grey_t - grey_(t-1)| is under STILL_DIFF, and so did every
# pixel within STILL_REACH: a flat area inside a moving edge changes little while its mask rightly does.
STILL_DIFF = 0.02
STILL_REACH = 8
MOVED = 0.05  # blurred change over which the picture moved


def picture_change(greys: torch.Tensor) -> torch.Tensor:
    """(T-1,1,h,w) blurred |grey_t - grey_(t-1)|."""
    return box_blur((greys[1:] - greys[:-1]).abs(), 2)


def changed_pairs(greys: torch.Tensor) -> torch.Tensor:
    """(T-1,) bool: pairs whose picture changed at all. An exact repeat (chaplin.mp4 repeats every third frame)
    gives the same mask and would dilute the figures."""
    return (greys[1:] - greys[:-1]).abs().flatten(1).amax(1) > 1e-6


def still_flicker(alphas: torch.Tensor, greys: torch.Tensor) -> dict:
    """|alpha_t - alpha_(t-1)| over the still pixels of the pairs that changed: mean, 99th percentile, and the
    share of pixels counted."""
    keep = changed_pairs(greys)
    still = max_filter(picture_change(greys), STILL_REACH) < STILL_DIFF
    still &= keep.view(-1, 1, 1, 1)
    v = (alphas[1:] - alphas[:-1]).abs()[still]
    if v.numel() == 0:
        return {"mean": None, "p99": None, "still_share": 0.0, "pairs": int(keep.sum())}
    p99 = torch.quantile(v[:: max(1, v.numel() // 1_000_000)].float(), 0.99)  # quantile's input is capped
    return {"mean": float(v.mean()), "p99": float(p99), "still_share": float(still.float().mean()),
            "pairs": int(keep.sum())}


def gradient(a: torch.Tensor) -> torch.Tensor:
    """|grad a| by forward differences, same size."""
    gx = F.pad(a[..., :, 1:] - a[..., :, :-1], (0, 1))
    gy = F.pad(a[..., 1:, :] - a[..., :-1, :], (0, 0, 0, 1))
    return (gx * gx + gy * gy).sqrt()


def edge_lag(out: torch.Tensor, raw: torch.Tensor, greys: torch.Tensor) -> float | None:
    """Mask pixels by which ``out``'s edges trail ``raw``'s where the picture moved: sum |out - raw| over sum
    |grad raw| there (the area between the two edges over the edge's length). None where nothing moved."""
    moved = max_filter((picture_change(greys) > MOVED).float(), 2) > 0
    edge = gradient(raw[1:])[moved].sum()
    if float(edge) < 1:
        return None
    return float((out[1:] - raw[1:]).abs()[moved].sum() / edge)


def edge_quality(alpha: torch.Tensor, frame: torch.Tensor) -> dict:
    """An alpha (1,1,H,W) against its frame (1,3|1,H,W) in the band around its edge: the correlation of |grad
    alpha| with |grad grey| (does the edge follow the picture's), the mean |grad alpha|^2 (sharper is larger) and
    the soft edge's width in pixels (0.05 < alpha < 0.95, over the edge's length). None without an edge."""
    ga, gi = gradient(alpha), gradient(grey(frame))
    band = max_filter(((alpha > 0.02) & (alpha < 0.98)).float(), 3) > 0
    a, i = ga[band].double(), gi[band].double()
    length = float(ga.sum())  # an edge from 0 to 1 integrates to 1 across: the sum is its length in pixels
    if a.numel() < 16 or length < 8:
        return {"grad_corr": None, "grad_energy": None, "soft_width_px": None}
    soft = float(((alpha > 0.05) & (alpha < 0.95)).sum())
    return {"grad_corr": float(torch.corrcoef(torch.stack([a, i]))[0, 1]), "grad_energy": float((a * a).mean()),
            "soft_width_px": soft / length}
