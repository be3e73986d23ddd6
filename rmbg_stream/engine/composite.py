"""After the network, on the device: edge-aware alpha upsampling, foreground colours, background modes.

Frames are float (B,3,H,W) in 0..1, alphas (B,1,H,W). For clean edges pass ``decontaminate(frame, alpha)`` as the
foreground. Video backgrounds need nothing special: the caller decodes the current background frame, runs it
through ``prepare_background`` (or uploads it and calls ``fit_background``) and passes it to ``composite_image``;
file and video I/O stay out of this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from .background import Background, parse_background  # noqa: F401 (re-exported: many front ends import them here)
from .filters import area, box_blur, gaussian_blur, half, on_opencv, resize_bilinear, upsample2x
from .preprocess import resize


def _wide_blur(x: torch.Tensor, r: int) -> torch.Tensor:
    """Box blur for large radii on a downscaled copy: the result is smooth, so little is lost and much is saved."""
    f = max(1, r // 8)
    if f == 1:
        return box_blur(x, r)
    h, w = x.shape[-2:]
    small = area(x, (math.ceil(h / f), math.ceil(w / f)))
    return resize_bilinear(box_blur(small, round(r / f)), (h, w))


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB -> (B,1,H,W) BT.601 luma, as ``smoothing.grey`` (within float rounding), in one buffer: grey's
    five full-size temporaries cost page faults on the CPU. One channel passes through."""
    if x.shape[1] == 1:
        return x
    out = torch.mul(x[:, 0:1], 0.299)
    return out.add_(x[:, 1:2], alpha=0.587).add_(x[:, 2:3], alpha=0.114)


# Chosen on real selfie masks of real footage (scripts/quality_real.py, issue 18): of 1e-2, 1e-3 and 1e-4 it keeps
# the soft edge narrowest (14.0 px on chaplin.mp4 against 15.1 and 19.7; bilinear 12.7) and sharpest, and follows
# the picture's edges as well as 1e-3 (gradient correlation 0.54 against 0.55; bilinear 0.32).
GUIDED_EPS = 1e-4


def guided_upsample(alpha_lr: torch.Tensor, guide_hr: torch.Tensor, radius: int = 2,
                    eps: float = GUIDED_EPS) -> torch.Tensor:
    """Fast guided filter (He & Sun 2015): alpha (B,1,h,w) -> (B,1,H,W) following the edges of guide (B,3|1,H,W).

    The linear model alpha ~ A*I + b is fitted in (2*radius+1)^2 windows at low resolution against the
    downsampled grey guide; A and b are smooth, so they upsample bilinearly without loss and the full-resolution
    guide puts the sharp edges back. ``eps`` limits A where the guide is flat (larger = smoother, less texture).
    """
    dtype = alpha_lr.dtype
    p = alpha_lr.float()
    i_hr = _luma(guide_hr.float())
    size_lr, size_hr = tuple(p.shape[-2:]), tuple(i_hr.shape[-2:])
    exact2x = (size_lr[0] * 2, size_lr[1] * 2) == size_hr
    if size_lr == size_hr:
        i = i_hr
    else:
        i = half(i_hr) if exact2x else area(i_hr, size_lr)
    # One filter call for the four means: per-call overhead dominates at these sizes.
    m = box_blur(torch.cat([i, p, i * p, i * i], 1), radius)
    mean_i, mean_p = m[:, 0:1], m[:, 1:2]
    cov_ip = m[:, 2:3] - mean_i * mean_p
    var_i = m[:, 3:4] - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    ab = box_blur(torch.cat([a, b], 1), radius)
    ab = upsample2x(ab) if exact2x else resize_bilinear(ab, size_hr)
    return torch.addcmul(ab[:, 1:], ab[:, :1], i_hr).clamp_(0, 1).to(dtype)


def decontaminate(frame: torch.Tensor, alpha: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """Foreground colour estimate (B,C,H,W) so soft edges lose the old background's colour (any planes: RGB, or
    the luma / chroma planes of a YUV frame with the alpha at their size).

    Blur-fusion estimator (Forte & Pitie, "Approximate Fast Foreground Colour Estimation", ICIP 2021), two passes:
    with local means F_b, B_b of foreground and background, F = F_b + alpha * (I - alpha*F_b - (1-alpha)*B_b).
    The first pass uses a wide ``radius`` (default 5% of the long side, at least 8; ~90 px at 1080p as in the paper)
    to reach past the soft band, the second a narrow one (radius/15) to recover local detail. Where alpha is 1 the
    result is the frame itself; where it is 0 the colour is meaningless (composites weight it by 0).
    """
    dtype = frame.dtype
    img, a = frame.float(), alpha.float()
    r1 = radius if radius is not None else max(8, round(0.05 * max(img.shape[-2:])))
    r2 = max(1, r1 // 15)
    fg, bg = img, img
    c = img.shape[1]
    for r, blur in ((r1, _wide_blur), (r2, box_blur)):
        # One blur call for all channels; weights are blurred alongside so the means are alpha-weighted.
        s = blur(torch.cat([fg * a, bg * (1 - a), a], 1), r)
        fa, ba, ma = s[:, :c], s[:, c:2 * c], s[:, 2 * c:]
        fg_mean = fa / (ma + 1e-5)
        bg = ba / (1 - ma + 1e-5)
        fg = (fg_mean + a * (img - a * fg_mean - (1 - a) * bg)).clamp(0, 1)
    return fg.to(dtype)


def _check(frame: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Validates shapes; returns alpha in the frame's dtype (lerp wants one dtype, the network may give another)."""
    if frame.dim() != 4 or alpha.dim() != 4 or alpha.shape[1] != 1 or frame.shape[-2:] != alpha.shape[-2:]:
        raise ValueError(
            f"expected frame (B,3,H,W) and alpha (B,1,H,W), got {tuple(frame.shape)}, {tuple(alpha.shape)}"
        )
    return alpha.to(frame.dtype)


def composite_color(frame: torch.Tensor, alpha: torch.Tensor, rgb: Sequence[float]) -> torch.Tensor:
    """Foreground over a solid colour given as three 0..255 values (as ``Background.color``)."""
    alpha = _check(frame, alpha)
    # Filled per channel from Python scalars: a tensor built from the list would be a blocking host->device copy.
    bg = torch.cat([frame.new_full((1, 1, 1, 1), c / 255.0) for c in rgb], 1)
    return torch.lerp(bg, frame, alpha)


def composite_image(frame: torch.Tensor, alpha: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Foreground over a background (1|B,3,H,W) 0..1 at frame size, e.g. from ``prepare_background``."""
    alpha = _check(frame, alpha)
    if bg.shape[-2:] != frame.shape[-2:]:
        raise ValueError(f"background {tuple(bg.shape)} does not match frame {tuple(frame.shape)}")
    return torch.lerp(bg.to(frame.dtype), frame, alpha)


def composite_blur(
    frame: torch.Tensor, alpha: torch.Tensor, strength: float = 0.5, fg: torch.Tensor | None = None
) -> torch.Tensor:
    """Foreground over its own background blurred; strength 0..1 maps to sigma up to 4% of the short side.
    Any number of planes (RGB, or YUV planes with the alpha at their size).

    The background is blurred premultiplied, blur(frame*(1-alpha)) / blur(1-alpha), so the person's colours do not
    bleed into the blurred background as a halo. ``fg`` (e.g. decontaminated colours) replaces the frame as the
    foreground; the background always comes from ``frame``.
    """
    alpha = _check(frame, alpha)
    fg = frame if fg is None else fg.to(frame.dtype)
    sigma = 0.04 * min(frame.shape[-2:]) * min(max(float(strength), 0.0), 1.0)
    if sigma < 0.3:
        return fg * alpha + frame * (1 - alpha)
    h, w = frame.shape[-2:]
    # Blur on a copy downscaled so that sigma is 2-4 pixels there: the kernel stays short at any strength.
    f = max(1, int(sigma // 2))
    b, c = frame.shape[:2]
    # frame*(1-alpha) and 1-alpha written into one buffer: no full-size temporaries (each is fresh memory, often
    # page faults, on the CPU).
    x = frame.new_empty((b, c + 1, h, w))
    torch.neg(alpha, out=x[:, c:]).add_(1)
    torch.mul(frame, x[:, c:], out=x[:, :c])
    if f > 1:
        x = area(x, (math.ceil(h / f), math.ceil(w / f)))
    x = gaussian_blur(x, sigma / f)
    # A weighted mean of background pixels, so it stays in 0..1; where no background is near (deep inside the
    # person, alpha ~ 1) the value is hidden by the foreground anyway. Divided before upsampling: one plane less.
    bg = resize_bilinear((x[:, :c] / x[:, c:].clamp_min(1e-4)).clamp_(0, 1), (h, w))
    return bg.lerp_(fg, alpha)  # bg is ours: the result goes into it


def to_rgba(frame: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(B,4,H,W) with straight (not premultiplied) colour, as PNG/WebM/OBS expect."""
    alpha = _check(frame, alpha)
    return torch.cat([frame, alpha], 1)


def _scaled(x: torch.Tensor) -> torch.Tensor:
    # Three passes instead of four: +0.5 then truncation rounds the (non-negative) values.
    return x.mul(255).add_(0.5).clamp_(0, 255)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float 0..1 (B,C,H,W) -> uint8, rounded, layout kept."""
    if on_opencv(x):
        # torch's float -> uint8 cast does not vectorise on the CPU (~1.4 ms for 640x480x3, against ~0.1 ms for
        # numpy's, which truncates the same way).
        return torch.from_numpy(_scaled(x).numpy().astype(np.uint8))
    return _scaled(x).to(torch.uint8)


def to_uint8_hwc(*parts: torch.Tensor) -> torch.Tensor:
    """Float 0..1 (B,C_i,H,W) parts, taken as their concatenation along C -> (B,H,W,C) uint8, rounded: the
    interleaved image the host gets (RGB, RGBA with the alpha as the last part)."""
    if not all(on_opencv(p) for p in parts):
        return to_uint8(torch.cat(parts, 1) if len(parts) > 1 else parts[0]).permute(0, 2, 3, 1).contiguous()
    # On the CPU an NCHW -> NHWC uint8 copy in torch costs ~2.5 ms at 640x480 (the cast ~1.4 ms more); OpenCV
    # interleaves the planes in ~0.05 ms. A part given several times (the mask view) is converted once.
    converted: dict[int, np.ndarray] = {}
    for p in parts:
        if id(p) not in converted:
            converted[id(p)] = to_uint8(p).numpy()
    planes = [converted[id(p)] for p in parts]
    b, (h, w) = parts[0].shape[0], parts[0].shape[-2:]
    out = np.empty((b, h, w, sum(p.shape[1] for p in planes)), np.uint8)
    for i in range(b):
        rows = [c for p in planes for c in p[i]]
        if len(rows) == 1:
            out[i, ..., 0] = rows[0]
        elif cv2.merge(rows, dst=out[i]).ctypes.data != out[i].ctypes.data:  # not written in place: never seen
            out[i] = cv2.merge(rows)
    return torch.from_numpy(out)


def fit_background(bg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Cover fit of a float (1|B,3,h,w) background already on the device to (1|B,3,height,width).

    Scaled uniformly until it covers the frame, then centre-cropped, so it is never distorted.
    """
    h, w = bg.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    # Antialiased when shrinking (any side shrinks exactly when scale < 1), in steps a huge image does not overflow
    # on CUDA (preprocess.MAX_SHRINK).
    bg = resize(bg, (nh, nw))
    top, left = (nh - height) // 2, (nw - width) // 2
    return bg[..., top : top + height, left : left + width].contiguous()


def prepare_background(image, height: int, width: int, device=None) -> torch.Tensor:
    """uint8 HxWx3 RGB image (numpy or torch; grey HxW and RGBA accepted) -> float (1,3,height,width) on `device`.

    Cover fit as ``fit_background``. One host->device copy per call: call it once per background image, or per
    decoded background-video frame (or upload the frame yourself and call ``fit_background``).
    """
    x = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else torch.as_tensor(image)
    if x.dim() == 2:
        x = x[..., None].expand(-1, -1, 3)
    x = x[..., :3].to(device).permute(2, 0, 1)[None].float().div_(255)
    return fit_background(x, height, width)
