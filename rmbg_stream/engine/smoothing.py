"""Motion-adaptive temporal smoothing of alpha mattes, and the dtSSD flicker metric.

The network sees every frame on its own, so soft edges flicker even when nothing moves. Each pixel keeps an
exponential moving average whose weight opens up wherever the image moved (or the alpha changed coherently over
an area near where the image changed), so a still scene is steady while moving edges are followed in the same
frame.

A trained network's worst flicker on a still picture is a whole blob flipping or dropping out for a frame or
three. That is a coherent alpha change too, but with no change in the picture around it: the alpha-change gate
opens only where the picture changed a little as well, so such a flip is held back like noise instead of passing
straight through. Figures: scripts/quality_real.py; regression tests on real masks: tests/test_smoothing_real.py.

Batched state, for ``smooth_batch``: ``prev_alphas`` (B,1,h,w) is each stream's previous *smoothed* alpha and
``prev_frames`` (B,1,h,w) its previous grey frame (colour (B,3,h,w) is accepted too). A stream without history
(first frame, new resolution) is a row of NaN in ``prev_alphas`` (``no_history`` makes one); ``None`` means no
stream has history. After each batch the caller keeps ``alphas_out`` and ``grey(frames)`` as the new state.
Everything stays on the device: no host syncs in the per-frame path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .filters import box_blur, downscale, max_filter, upsample2x

# Side of the thumbnail the scene-cut test compares; coarse so that ordinary motion barely changes it.
_THUMB = 32
# Side of the coarse grid the motion gate is computed on.
_GATE = 64
# The strength streams start with, chosen on real masks (scripts/quality_real.py, issue 18): against 0.5 it cuts
# the flicker of a still picture under sensor noise 4.4x instead of 2.1x, and chaplin.mp4's 1.7x instead of 1.2x,
# for 0.4 px of lag there instead of 0.2 (2.3 px instead of 1.2 on example3.mp4's slow figure in the snow).
DEFAULT_STRENGTH = 0.8


def grey(frames: torch.Tensor) -> torch.Tensor:
    """(B,3,h,w) RGB -> (B,1,h,w) luma (BT.601); 1-channel input passes through."""
    if frames.shape[1] == 1:
        return frames
    # Python scalars rather than a weight tensor: building one from a list would be a blocking host->device copy.
    return frames[:, 0:1] * 0.299 + frames[:, 1:2] * 0.587 + frames[:, 2:3] * 0.114


def no_history(n: int, h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Placeholder rows for ``prev_alphas`` / ``prev_frames`` of streams that have no previous frame."""
    return torch.full((n, 1, h, w), float("nan"), device=device, dtype=dtype)


def _smoothstep(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    t = ((x - lo) / (hi - lo)).clamp(0, 1)
    return t * t * (3 - 2 * t)


def smooth_batch(
    alphas: torch.Tensor,
    frames: torch.Tensor,
    prev_alphas: torch.Tensor | None,
    prev_frames: torch.Tensor | None,
    strengths: float | Sequence[float] | torch.Tensor,
    *,
    radius: int = 2,
    motion_low: float = 0.03,
    motion_high: float = 0.08,
    change_low: float = 0.15,
    change_high: float = 0.35,
    confirm_low: float = 0.02,
    confirm_high: float = 0.05,
    cut_threshold: float = 0.12,
    max_keep: float = 0.9,
    all_history: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth one batch of alphas (B,1,h,w) given frames (B,3,h,w) RGB or (B,1,h,w) grey, 0..1, at the same size
    and per-stream history.

    ``strengths``: 0..1 per row (float, sequence or (B,) tensor); 0 returns the raw alpha. At a still pixel the
    new alpha gets weight ``1 - max_keep * strength``; motion in the image (blurred |frame - prev_frame| between
    ``motion_low`` and ``motion_high``) or a coherent alpha change (|blurred alpha - prev| between ``change_low``
    and ``change_high``, where the motion is at least between ``confirm_low`` and ``confirm_high``) raises the
    weight to 1. A row whose thumbnail mean abs difference exceeds
    ``cut_threshold`` is a scene cut and is passed through raw, like a row without history.

    ``all_history``: the caller knows no row is a NaN placeholder, which saves three full-size passes.

    Returns ``(alphas_out, scene_cut)``: scene_cut is a (B,) bool tensor, True where a cut was detected
    (rows without history are False).
    """
    b = alphas.shape[0]
    if prev_alphas is None or prev_frames is None:
        return alphas, torch.zeros(b, dtype=torch.bool, device=alphas.device)
    if isinstance(strengths, (int, float)):
        keep = max_keep * min(max(float(strengths), 0.0), 1.0)
    else:
        # non_blocking: a fresh host tensor is staged at once, so this does not wait for the device.
        s = torch.as_tensor(strengths, dtype=alphas.dtype).to(alphas.device, non_blocking=True)
        keep = max_keep * s.clamp(0, 1).reshape(b, 1, 1, 1)

    g = grey(frames)
    if all_history:
        has_prev, hp = torch.ones(b, dtype=torch.bool, device=alphas.device), None
        pa, pg = prev_alphas, grey(prev_frames)
    else:
        has_prev = ~prev_alphas.flatten(1).isnan().any(1)
        hp = has_prev.view(b, 1, 1, 1)
        # Substitute the current frame for missing history so NaNs never reach the arithmetic.
        pa = torch.where(hp, prev_alphas, alphas)
        pg = torch.where(hp, grey(prev_frames), g)

    # The gate only needs blurred quantities, so it is computed on a grid of at most ~_GATE pixels a side and
    # upsampled: large frames cost a few full-resolution passes instead of dozens.
    h, w = alphas.shape[-2:]
    scale = max(1, min(h, w) // _GATE)
    r = max(1, round(radius / scale)) if scale > 1 else radius
    diff = g - pg
    da = alphas - pa
    dg = diff.abs()
    if scale > 1:
        coarse = downscale(torch.cat([dg, da, diff], 1), scale)
        dg, da, diff = coarse[:, 0:1], coarse[:, 1:2], coarse[:, 2:3]
    # Means are linear: the thumbnail of the difference is the difference of the thumbnails.
    thumb_diff = F.adaptive_avg_pool2d(diff, _THUMB).abs().mean((1, 2, 3))
    cut = has_prev & (thumb_diff > cut_threshold)

    # Blur averages sensor noise down to its mean before the threshold; the dilation then covers the soft alpha
    # band around a moving edge, which extends past the pixels whose colour changed.
    blurred = box_blur(torch.cat([dg, da], 1), r)
    motion = max_filter(blurred[:, :1], 2 * r)
    # Signed blur: jitter and isolated flips average out, an edge that really moved (even one with little colour
    # contrast to see it by) does not.
    change = blurred[:, 1:].abs()
    # An alpha change counts only where the picture changed a little too (a low-contrast edge moving): a blob of
    # alpha flipping over a still picture is the network's flicker, held back like noise.
    confirmed = _smoothstep(change, change_low, change_high) * _smoothstep(motion, confirm_low, confirm_high)
    gate = torch.maximum(_smoothstep(motion, motion_low, motion_high), confirmed)
    gate = torch.where(cut.view(b, 1, 1, 1), 1.0, gate)  # a cut passes the raw alpha: weight 1 below
    if scale > 1:
        exact2x = gate.shape[-2] * 2 == h and gate.shape[-1] * 2 == w
        gate = upsample2x(gate) if exact2x else F.interpolate(gate, size=(h, w), mode="bilinear", align_corners=False)
    weight = (1 - keep * (1 - gate)).to(alphas.dtype)
    out = torch.lerp(pa, alphas, weight)  # exact at weight 1, so strength 0 and cuts return the raw alpha
    if hp is not None:
        out = torch.where(hp, out, alphas)
    return out, cut


class TemporalSmoother:
    """Per-stream state for ``smooth_batch``: previous smoothed alpha and previous grey frame.

    ``scene_cut`` is a (1,) bool tensor from the last call (kept on the device; read it only when needed).
    """

    def __init__(self, **params):
        self.params = params  # keyword arguments of smooth_batch
        self.reset()

    def reset(self) -> None:
        self.prev_alpha: torch.Tensor | None = None
        self.prev_grey: torch.Tensor | None = None
        self.scene_cut: torch.Tensor | None = None

    def __call__(self, alpha: torch.Tensor, frame_small: torch.Tensor, strength: float) -> torch.Tensor:
        """alpha (1,1,h,w), frame_small (1,3,h,w) 0..1 at the same size; strength 0..1, 0 = off."""
        prev_a, prev_g = self.prev_alpha, self.prev_grey
        if prev_a is not None and prev_a.shape != alpha.shape:
            prev_a = prev_g = None
        out, self.scene_cut = smooth_batch(alpha, frame_small, prev_a, prev_g, strength,
                                           all_history=prev_a is not None, **self.params)
        # Stored even when off, so turning smoothing on later starts from the current frame.
        self.prev_alpha, self.prev_grey = out, grey(frame_small)
        return out


def _as_seq(x) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        x = torch.stack([torch.as_tensor(np.asarray(f)) if not torch.is_tensor(f) else f for f in x])
    return torch.as_tensor(x).double().flatten(1)


def dtssd(pred_seq, true_seq) -> float:
    """Mean dtSSD over a sequence, as Robust Video Matting reports it (alpha in 0..1, result x1e2).

    Frame t >= 1 scores sqrt(sum(((p_t - p_{t-1}) - (g_t - g_{t-1}))^2) / N) * 100 with N pixels per frame;
    frame 0 scores 0 and is included in the mean. Sequences: (T,H,W), (T,1,H,W), numpy, torch or lists of frames.
    """
    p = _as_seq(pred_seq)
    g = _as_seq(true_seq).to(p.device)
    if p.shape != g.shape:
        raise ValueError(f"dtssd: shapes differ, {tuple(p.shape)} vs {tuple(g.shape)}")
    if p.shape[0] < 2:
        return 0.0
    d = (p[1:] - p[:-1]) - (g[1:] - g[:-1])
    return float((d.pow(2).mean(1).sqrt() * 1e2).sum() / p.shape[0])


def smooth_streams(smoothers: Sequence[TemporalSmoother], alphas: torch.Tensor, frames_small: torch.Tensor,
                   strengths: Sequence[float]) -> torch.Tensor:
    """Smooths rows of alpha (B,1,h,w) float 0..1 of one size, row i belonging to ``smoothers[i]``, with
    ``frames_small`` (B,3,h,w) their frames. A stream may own several rows (a file stream's consecutive frames,
    in order): each is smoothed against the one before it, so the rows go in waves that hold each stream at most
    once. A wave is one ``smooth_batch`` call: a batch of many streams costs the same few dozen small ops as a
    single frame. Strength 0 leaves a row raw and its stream without history, as ``TemporalSmoother`` does."""
    waves: list[list[int]] = []
    seen: dict[int, int] = {}
    for i, sm in enumerate(smoothers):
        k = seen[id(sm)] = seen.get(id(sm), -1) + 1
        if k == len(waves):
            waves.append([])
        waves[k].append(i)
    if len(waves) == 1:
        return _smooth_wave(smoothers, alphas, frames_small, strengths)
    # Rows are gathered by slicing and concatenating, not by a list index: that would copy an index to the device
    # and wait for it, a host sync the rest of the per-frame path avoids.
    out: list[torch.Tensor] = [alphas[:0]] * len(smoothers)
    for rows in waves:
        part = _smooth_wave([smoothers[i] for i in rows], torch.cat([alphas[i:i + 1] for i in rows]),
                            torch.cat([frames_small[i:i + 1] for i in rows]), [strengths[i] for i in rows])
        for j, i in enumerate(rows):
            out[i] = part[j:j + 1]
    return torch.cat(out)


def _smooth_wave(smoothers: Sequence[TemporalSmoother], alphas: torch.Tensor, frames_small: torch.Tensor,
                 strengths: Sequence[float]) -> torch.Tensor:
    """``smooth_streams`` for rows of distinct streams. The first smoother's params apply to all."""
    if all(s <= 0 for s in strengths):
        for sm in smoothers:
            sm.reset()
        return alphas
    b, _, h, w = alphas.shape
    prev_a, prev_g, missing = [], [], False
    for sm in smoothers:
        if sm.prev_alpha is not None and sm.prev_alpha.shape == (1, 1, h, w):
            prev_a.append(sm.prev_alpha)
            prev_g.append(sm.prev_grey)
        else:
            prev_a.append(no_history(1, h, w, alphas.device, alphas.dtype))
            prev_g.append(no_history(1, h, w, alphas.device, alphas.dtype))
            missing = True
    g = grey(frames_small)
    same = all(x == strengths[0] for x in strengths)  # one float: no per-row tensor to build
    out, cut = smooth_batch(alphas, g, torch.cat(prev_a), torch.cat(prev_g),
                            float(strengths[0]) if same else list(strengths), all_history=not missing,
                            **smoothers[0].params)
    for i, (sm, strength) in enumerate(zip(smoothers, strengths)):
        if strength <= 0:
            sm.reset()  # off: switched on again, it starts from that frame
        else:
            sm.prev_alpha, sm.prev_grey, sm.scene_cut = out[i:i + 1], g[i:i + 1], cut[i:i + 1]
    return out
