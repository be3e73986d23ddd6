"""The CPU fast paths of the engine's stages give the pixels the plain torch code gave.

Each reference below is the code as it was before the OpenCV paths (commit 1b5ecb1): F.interpolate for every
resampling, a replicate-padded conv2d Gaussian, smoothing.grey for the guide, torch's uint8 cast and permute. The
fast paths compute the same formulas in another order, so floats agree to float32 rounding (stated per test) and
uint8 outputs are equal except where a value sits within rounding of a .5 step (at most 1 LSB, on a tiny share
of pixels). Sizes are odd and non-square on purpose.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rmbg_stream.engine import composite, render
from rmbg_stream.engine.background import Background
from rmbg_stream.engine.engine import to_float as engine_to_float
from rmbg_stream.engine.filters import box_blur, half, upsample2x
from rmbg_stream.engine.preprocess import to_float
from rmbg_stream.engine.smoothing import grey
from rmbg_stream.engine.streams import StreamOptions

FLOAT_ATOL = 2e-5  # 0.005 of an 8-bit step: float32 rounding of sums taken in another order


def ref_resize(x, size):
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear",
                                                                     align_corners=False)


def ref_gaussian(x, sigma):
    k = max(1, math.ceil(3 * sigma))
    t = torch.arange(-k, k + 1, dtype=x.dtype)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (k, k, 0, 0), mode="replicate"), g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, k, k), mode="replicate"), g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ref_guided(alpha_lr, guide_hr, radius, eps):
    p, i_hr = alpha_lr.float(), grey(guide_hr.float())
    size_lr, size_hr = tuple(p.shape[-2:]), tuple(i_hr.shape[-2:])
    exact2x = (size_lr[0] * 2, size_lr[1] * 2) == size_hr
    if size_lr == size_hr:
        i = i_hr
    else:
        i = F.avg_pool2d(i_hr, 2) if exact2x else F.interpolate(i_hr, size=size_lr, mode="area")
    m = box_blur(torch.cat([i, p, i * p, i * i], 1).double(), radius).float()
    mean_i, mean_p = m[:, 0:1], m[:, 1:2]
    a = (m[:, 2:3] - mean_i * mean_p) / (m[:, 3:4] - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    ab = box_blur(torch.cat([a, b], 1).double(), radius).float()
    ab = ref_resize(ab, size_hr)
    return torch.addcmul(ab[:, 1:], ab[:, :1], i_hr).clamp_(0, 1)


def ref_blur(frame, alpha, strength, fg=None):
    fg = frame if fg is None else fg
    sigma = 0.04 * min(frame.shape[-2:]) * min(max(float(strength), 0.0), 1.0)
    if sigma < 0.3:
        return fg * alpha + frame * (1 - alpha)
    h, w = frame.shape[-2:]
    f = max(1, int(sigma // 2))
    c = frame.shape[1]
    x = torch.cat([frame * (1 - alpha), 1 - alpha], 1)
    if f > 1:
        x = F.interpolate(x, size=(math.ceil(h / f), math.ceil(w / f)), mode="area")
    x = ref_gaussian(x, sigma / f)
    bg = ref_resize((x[:, :c] / x[:, c:].clamp_min(1e-4)).clamp_(0, 1), (h, w))
    return torch.lerp(bg, fg, alpha)


def ref_decontaminate(frame, alpha):
    def wide(x, r):
        f = max(1, r // 8)
        if f == 1:
            return box_blur(x.double(), r).float()
        h, w = x.shape[-2:]
        small = F.interpolate(x, size=(math.ceil(h / f), math.ceil(w / f)), mode="area")
        return ref_resize(box_blur(small.double(), round(r / f)).float(), (h, w))

    img, a = frame, alpha
    r1 = max(8, round(0.05 * max(img.shape[-2:])))
    r2 = max(1, r1 // 15)
    fg, bg, c = img, img, img.shape[1]
    for r, blur in ((r1, wide), (r2, lambda x, r: box_blur(x.double(), r).float())):
        s = blur(torch.cat([fg * a, bg * (1 - a), a], 1), r)
        fa, ba, ma = s[:, :c], s[:, c:2 * c], s[:, 2 * c:]
        fg_mean = fa / (ma + 1e-5)
        bg = ba / (1 - ma + 1e-5)
        fg = (fg_mean + a * (img - a * fg_mean - (1 - a) * bg)).clamp(0, 1)
    return fg


def ref_uint8_hwc(x):
    return x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def scene(b, c, h, w, seed=0):
    """Smooth colours with a few sharp edges and a soft round alpha: what the stages see, at any size."""
    gen = torch.Generator().manual_seed(seed)
    frame = F.interpolate(torch.rand(b, c, h // 4 + 2, w // 4 + 2, generator=gen), size=(h, w), mode="bilinear")
    frame[..., h // 3:, : w // 2] = 0.9 * frame[..., h // 3:, : w // 2] + 0.1
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    r = ((yy - h / 2) ** 2 + (xx - w / 2.3) ** 2).sqrt()
    alpha = ((0.35 * min(h, w) - r) / 3).clamp(0, 1).expand(b, 1, h, w).contiguous()
    return frame, alpha


def assert_uint8_close(got, want):
    """Equal, but for values within rounding of a .5 step: at most 1 LSB on at most 0.1 % of the values."""
    assert got.shape == want.shape and got.dtype == want.dtype == torch.uint8
    d = (got.int() - want.int()).abs()
    assert d.max() <= 1 and (d > 0).float().mean() <= 1e-3, (int(d.max()), float((d > 0).float().mean()))


ODD = [(61, 97), (479, 641), (37, 250)]


@pytest.mark.parametrize("hw", [(479, 641), (1, 5), (33, 2)])
def test_frames_become_the_same_floats_as_before(hw):
    rgba = np.random.default_rng(0).integers(0, 256, (*hw, 4), dtype=np.uint8)
    for view in (rgba[..., :3], np.ascontiguousarray(rgba[..., :3]), rgba[::-1, ..., :3]):
        t = torch.from_numpy(view.copy() if view.strides[0] < 0 else view)
        want = t.permute(2, 0, 1).unsqueeze(0).contiguous().float().mul_(1 / 255)
        got = to_float(t)
        assert got.is_contiguous() and torch.equal(got, want)
    assert engine_to_float is to_float  # the engine re-exports it


@pytest.mark.parametrize("hw", ODD)
@pytest.mark.parametrize("low", [(256, 256), (31, 49), None])
def test_guided_upsampling_matches_the_interpolate_version(hw, low):
    h, w = hw
    frame, alpha = scene(2, 3, h, w)
    size = low or ((h + 1) // 2, (w + 1) // 2)
    alpha_lr = F.interpolate(alpha, size=size, mode="area")
    for guide in (frame, grey(frame)):  # RGB, and the luma plane of a 4:2:0 frame
        got = composite.guided_upsample(alpha_lr, guide, 2, 1e-4)
        torch.testing.assert_close(got, ref_guided(alpha_lr, guide, 2, 1e-4), atol=FLOAT_ATOL, rtol=0)


def test_guided_upsampling_at_exactly_twice_the_size_and_at_the_same_size():
    frame, alpha = scene(1, 3, 122, 194)
    for alpha_lr in (F.avg_pool2d(alpha, 2), alpha):
        got = composite.guided_upsample(alpha_lr, frame, 2, 1e-3)
        torch.testing.assert_close(got, ref_guided(alpha_lr, frame, 2, 1e-3), atol=FLOAT_ATOL, rtol=0)


@pytest.mark.parametrize("hw", ODD + [(480, 640), (720, 1280)])
@pytest.mark.parametrize("strength", [0.05, 0.5, 1.0])
def test_blur_composite_matches_the_interpolate_version(hw, strength):
    """480x640 at 0.5 downscales by 4 exactly (the block-mean path), 720x1280 by 7 (not exactly)."""
    frame, alpha = scene(1, 3, *hw)
    fg = (frame * 0.8).contiguous()
    got = composite.composite_blur(frame, alpha, strength, fg=fg)
    torch.testing.assert_close(got, ref_blur(frame, alpha, strength, fg), atol=FLOAT_ATOL, rtol=0)


def test_blur_composite_of_yuv_planes_matches_the_interpolate_version():
    frame, alpha = scene(2, 3, 120, 162)
    y, uv, alpha_half = frame[:, :1].contiguous(), half(frame[:, 1:]), half(alpha)
    torch.testing.assert_close(composite.composite_blur(y, alpha, 0.5), ref_blur(y, alpha, 0.5), atol=FLOAT_ATOL,
                               rtol=0)
    torch.testing.assert_close(composite.composite_blur(uv, alpha_half, 0.5), ref_blur(uv, alpha_half, 0.5),
                               atol=FLOAT_ATOL, rtol=0)


@pytest.mark.parametrize("hw", [(61, 97), (241, 321)])
def test_decontaminated_colours_match_the_interpolate_version(hw):
    frame, alpha = scene(1, 3, *hw)
    torch.testing.assert_close(composite.decontaminate(frame, alpha), ref_decontaminate(frame, alpha),
                               atol=FLOAT_ATOL, rtol=0)


def test_uint8_conversion_is_unchanged_to_the_bit():
    x = torch.tensor([-0.5, 0.0, 0.499, 0.5 / 255, 1.5 / 255, 0.502, 254.5 / 255, 1.0, 2.0, float("inf")])
    x = torch.cat([x, torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1]).view(1, 2, 5, -1)
    assert torch.equal(composite.to_uint8(x), x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8))
    assert torch.equal(composite.to_uint8_hwc(x), ref_uint8_hwc(x))


@pytest.mark.parametrize("hw", ODD)
def test_interleaved_outputs_are_the_permuted_uint8_planes(hw):
    frame, alpha = scene(3, 3, *hw)
    assert torch.equal(composite.to_uint8_hwc(frame), ref_uint8_hwc(frame))
    assert torch.equal(composite.to_uint8_hwc(frame, alpha), ref_uint8_hwc(torch.cat([frame, alpha], 1)))
    assert torch.equal(composite.to_uint8_hwc(alpha, alpha, alpha), ref_uint8_hwc(alpha.expand(-1, 3, -1, -1)))
    assert torch.equal(composite.to_uint8_hwc(alpha), ref_uint8_hwc(alpha))
    assert torch.equal(composite.to_uint8_hwc(frame[:, 1:]), ref_uint8_hwc(frame[:, 1:]))  # a strided view


@pytest.mark.parametrize("kind", ["blur", "color", "image", "transparent", "none"])
@pytest.mark.parametrize("mask_view", [False, True])
def test_rendered_rgb_frames_match_the_old_renderer(kind, mask_view):
    h, w = 121, 163
    frame, alpha = scene(1, 3, h, w)
    bg = scene(1, 3, h, w, seed=1)[0].flip(-1).contiguous()
    background = {"blur": Background("blur", strength=0.5), "color": Background("color", color=(0, 255, 51)),
                  "image": Background("image", path="x.png"), "transparent": Background("transparent"),
                  "none": Background("none")}[kind]
    o = StreamOptions(background=background, alpha=True, mask_view=mask_view)
    fmt, out = render.render_rgb(frame, alpha, o, bg if kind == "image" else None)
    if mask_view:
        want = alpha.expand(-1, 3, -1, -1)
    else:
        want = {"blur": lambda: ref_blur(frame, alpha, 0.5), "none": lambda: frame,
                "color": lambda: torch.lerp(torch.tensor([0.0, 1.0, 0.2]).view(1, 3, 1, 1), frame, alpha),
                "image": lambda: torch.lerp(bg, frame, alpha),
                "transparent": lambda: torch.cat([frame, alpha], 1)}[kind]()
    assert fmt == ("rgba" if kind == "transparent" and not mask_view else "rgb24")
    assert_uint8_close(out["image"], ref_uint8_hwc(want))
    assert torch.equal(out["alpha"], ref_uint8_hwc(alpha)[..., 0])


def test_upsampling_helpers_match_interpolate_on_an_odd_mask():
    x = scene(2, 2, 61, 97)[1].expand(2, 2, -1, -1).contiguous()
    torch.testing.assert_close(upsample2x(x), F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
                               atol=1e-6, rtol=0)
