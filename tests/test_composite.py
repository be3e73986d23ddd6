"""Compositing: guided upsampling, foreground colours, every background mode, cover fit, CLI strings."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rmbg_stream.engine.composite import (
    Background,
    composite_blur,
    composite_color,
    composite_image,
    decontaminate,
    fit_background,
    guided_upsample,
    parse_background,
    prepare_background,
    to_rgba,
    to_uint8,
)
from rmbg_stream.engine.preprocess import MAX_SHRINK, shrink_plan

H, W = 24, 32
RED = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
BLUE = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)


@pytest.fixture
def scene():
    """Two frames of random colours; alpha 1 on the left third, 0 on the right third, 0.5 in between."""
    gen = torch.Generator().manual_seed(0)
    frame = torch.rand(2, 3, H, W, generator=gen)
    alpha = torch.full((2, 1, H, W), 0.5)
    alpha[..., : W // 3] = 1
    alpha[..., 2 * W // 3 :] = 0
    return frame, alpha


def regions(alpha):
    return alpha[0, 0] == 1, alpha[0, 0] == 0, alpha[0, 0] == 0.5


def test_composite_color(scene):
    frame, alpha = scene
    out = composite_color(frame, alpha, (0, 255, 51))
    fg, bg, half = regions(alpha)
    assert out.shape == frame.shape
    assert torch.equal(out[..., fg], frame[..., fg])
    want = torch.tensor([0.0, 1.0, 0.2]).view(1, 3, 1)
    torch.testing.assert_close(out[..., bg], want.expand(2, 3, int(bg.sum())))
    torch.testing.assert_close(out[..., half], 0.5 * frame[..., half] + 0.5 * want)


def test_composite_image(scene):
    frame, alpha = scene
    bg_img = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(1))
    out = composite_image(frame, alpha, bg_img)
    fg, bg, half = regions(alpha)
    assert out.shape == frame.shape
    assert torch.equal(out[..., fg], frame[..., fg])
    torch.testing.assert_close(out[..., bg], bg_img[..., bg].expand(2, -1, -1))
    torch.testing.assert_close(out[..., half], 0.5 * frame[..., half] + 0.5 * bg_img[..., half])
    per_frame = torch.rand(2, 3, H, W)  # a video background: one image per frame
    torch.testing.assert_close(composite_image(frame, alpha, per_frame)[..., bg], per_frame[..., bg])
    with pytest.raises(ValueError):
        composite_image(frame, alpha, bg_img[..., :-1])


def test_composite_blur_blurs_background():
    n = 96
    stripes = (torch.arange(n) // 2 % 2).float().view(1, 1, 1, n).expand(1, 3, n, n)  # period 4 px
    alpha = torch.zeros(1, 1, n, n)
    alpha[..., 40:56, 40:56] = 1
    alpha[..., 44:52, 60:64] = 0.5
    frame = stripes.clone()
    frame[..., 40:56, 40:56] = RED.view(3, 1, 1)
    out = composite_blur(frame, alpha, 0.5)
    assert out.shape == frame.shape
    assert torch.equal(out[..., 40:56, 40:56], frame[..., 40:56, 40:56])
    far = out[..., :24, 8:-8]  # away from the person and from the image border
    assert far.std() < 0.05 and (far.mean() - 0.5).abs() < 0.05  # stripes (std 0.5) are blurred to grey
    # Half alpha mixes the frame with the blurred background; a black ``fg`` leaves (1 - alpha) * background.
    bg_part = composite_blur(frame, alpha, 0.5, fg=torch.zeros_like(frame))[..., 44:52, 60:64]
    torch.testing.assert_close(out[..., 44:52, 60:64], 0.5 * frame[..., 44:52, 60:64] + bg_part)
    assert (bg_part - 0.25).abs().max() < 0.05  # half of a blurred 0/1 stripe pattern
    assert torch.equal(composite_blur(frame, alpha, 0.0), frame)


def test_composite_blur_has_no_halo():
    n = 96
    alpha = torch.zeros(1, 1, n, n)
    alpha[..., 32:64, 32:64] = 1
    frame = BLUE.expand(1, 3, n, n).clone()
    frame[..., 32:64, 32:64] = RED.view(3, 1, 1)
    out = composite_blur(frame, alpha, 1.0)
    ring = torch.zeros(n, n, dtype=torch.bool)
    ring[28:68, 28:68] = True
    ring[32:64, 32:64] = False  # background pixels right next to the person
    assert out[0, 0][ring].max() < 0.02  # no red bleeding out
    torch.testing.assert_close(out[0, 2][ring], torch.ones(int(ring.sum())), atol=0.02, rtol=0)
    naive = F.avg_pool2d(frame, 9, 1, 4, count_include_pad=False)  # what a plain blur would do
    assert naive[0, 0][ring].max() > 0.3


def test_to_rgba_and_uint8(scene):
    frame, alpha = scene
    rgba = to_rgba(frame, alpha)
    assert rgba.shape == (2, 4, H, W)
    assert torch.equal(rgba[:, :3], frame) and torch.equal(rgba[:, 3:], alpha)
    u = to_uint8(torch.tensor([-0.5, 0.0, 0.499, 0.502, 1.0, 2.0]).view(1, 1, 1, 6))
    assert u.dtype == torch.uint8 and u.shape == (1, 1, 1, 6)
    assert u.flatten().tolist() == [0, 0, 127, 128, 255, 255]  # clamped and rounded, not truncated


def test_cover_fit_crops_without_scaling():
    img = np.random.default_rng(0).integers(0, 256, (200, 100, 3), dtype=np.uint8)
    out = prepare_background(img, 50, 100, "cpu")  # width already fits: crop the middle 50 rows
    assert out.shape == (1, 3, 50, 100) and out.dtype == torch.float32
    want = torch.from_numpy(img[75:125]).permute(2, 0, 1)[None].float() / 255
    torch.testing.assert_close(out, want)


def test_cover_fit_does_not_distort():
    # A tall image with a circle; the frame is square, so the image must be scaled 2x and cropped, not squashed.
    yy, xx = np.mgrid[0:100, 0:50] + 0.5
    disc = ((yy - 50) ** 2 + (xx - 25) ** 2) < 15**2
    img = np.where(disc[..., None], 255, 0).astype(np.uint8).repeat(3, 2)
    img = np.concatenate([img[:, :, :2], np.full((100, 50, 1), 255, np.uint8)], 2)  # blue channel: all 255
    out = prepare_background(img, 100, 100, "cpu")[0]
    assert out.shape == (3, 100, 100)
    inside = out[0] > 0.5
    rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert abs(int(height) - int(width)) <= 1 and abs(int(width) - 60) <= 2  # still round, diameter 30 * 2
    assert abs(float(rows.float().mean()) - 49.5) <= 1 and abs(float(cols.float().mean()) - 49.5) <= 1
    assert torch.equal(out[2], torch.ones(100, 100))
    # Same through the device-side entry point, batched.
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255).expand(2, -1, -1, -1)
    torch.testing.assert_close(fit_background(t, 100, 100), out[None].expand(2, -1, -1, -1))
    wide = prepare_background(img, 10, 100, "cpu")  # wider than tall: scale 2x, crop the middle rows
    assert wide.shape == (1, 3, 10, 100)


def test_guided_upsample_beats_bilinear_on_sharp_edges():
    n = 128
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
    true = (((yy - 60) ** 2 + (xx - 66) ** 2) < 38**2).float()[None, None]
    texture = F.interpolate(torch.rand(1, 3, n // 2, n // 2, generator=gen), size=(n, n), mode="bilinear")
    fg, bg = torch.tensor([0.9, 0.6, 0.3]).view(1, 3, 1, 1), torch.tensor([0.15, 0.25, 0.35]).view(1, 3, 1, 1)
    image = (true * fg + (1 - true) * bg + 0.15 * (texture - 0.5)).clamp(0, 1)
    low = F.interpolate(true, scale_factor=0.25, mode="area")
    bilinear = F.interpolate(low, size=(n, n), mode="bilinear", align_corners=False)
    guided = guided_upsample(low, image, 2, 1e-3)
    assert guided.shape == (1, 1, n, n) and guided.min() >= 0 and guided.max() <= 1
    err_bilinear, err_guided = (bilinear - true).abs().mean(), (guided - true).abs().mean()
    assert err_guided < 0.5 * err_bilinear, (err_guided, err_bilinear)
    # Same resolution: a plain guided filter, a flat alpha stays flat.
    flat = guided_upsample(torch.full((1, 1, n, n), 0.3), image)
    torch.testing.assert_close(flat, torch.full_like(flat, 0.3), atol=1e-4, rtol=0)


def test_decontaminate_recovers_foreground_colour():
    h, w = 64, 128
    fg, bg = torch.tensor([0.9, 0.2, 0.1]).view(1, 3, 1, 1), torch.tensor([0.1, 0.3, 0.9]).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(0)
    tex = 0.1 * torch.rand(1, 3, h, w, generator=gen)
    alpha = ((torch.arange(w).float() - 60) / 12).clamp(0, 1).view(1, 1, 1, w).expand(1, 1, h, w)
    frame = alpha * (fg + tex) + (1 - alpha) * (bg - tex)
    est = decontaminate(frame, alpha)
    assert est.shape == frame.shape and est.min() >= 0 and est.max() <= 1
    ramp = ((alpha > 0.05) & (alpha < 0.95)).expand_as(frame)
    err_raw = (frame - fg).abs()[ramp].mean()
    err_est = (est - fg).abs()[ramp].mean()
    assert err_est < 0.6 * err_raw, (err_est, err_raw)
    solid = (alpha == 1).expand_as(frame)
    torch.testing.assert_close(est[solid], frame[solid])  # opaque pixels keep their colour


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("#00ff33", Background("color", color=(0, 255, 51))),
        ("#0F3", Background("color", color=(0, 255, 51))),
        (" Green ", Background("color", color=(0, 255, 0))),
        ("grey", Background("color", color=(128, 128, 128))),
        ("blur", Background("blur", strength=0.5)),
        ("blur:0.25", Background("blur", strength=0.25)),
        ("transparent", Background("transparent")),
        ("none", Background("none")),
        ("beach.JPG", Background("image", path="beach.JPG")),
        ("dir/loop.mp4", Background("video", path="dir/loop.mp4")),
    ],
)
def test_parse_background(text, want):
    assert parse_background(text) == want


@pytest.mark.parametrize("text", ["", "#12", "#ggg", "blur:2", "blur:x", "notacolour", "notes.txt"])
def test_parse_background_rejects(text):
    with pytest.raises(ValueError, match="expected #rrggbb") as e:
        parse_background(text)
    assert "\n" not in str(e.value)


def test_no_host_reads():
    """Meta tensors have no data: any .item()/.cpu()/bool() on a tensor inside the per-frame math would raise."""
    frame, low = torch.rand(2, 3, 64, 64, device="meta"), torch.rand(2, 1, 16, 16, device="meta")
    alpha = guided_upsample(low, frame)
    fg = decontaminate(frame, alpha)
    bg = fit_background(torch.rand(1, 3, 30, 90, device="meta"), 64, 64)
    for out in (
        composite_color(fg, alpha, (0, 255, 0)),
        composite_image(fg, alpha, bg),
        composite_blur(frame, alpha, 1.0, fg=fg),
        to_rgba(fg, alpha)[:, :3],
    ):
        assert to_uint8(out).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("src, dst", [((15000, 20000), (61, 97)), ((3000, 4000), (73, 97)), ((2000, 3000), (65, 97)),
                                      ((100, 50), (10, 200)), ((80, 80), (10, 10)), ((37, 53), (37, 53))])
def test_antialiased_shrinks_go_in_steps_of_at_most_8x_and_end_at_the_target(src, dst):
    """CUDA's antialiased interpolate fails at about 30x: a 20000 px background onto a small frame got there."""
    plan = shrink_plan(src, dst)
    assert plan[-1] == dst
    for a, b in zip([src] + plan, plan):
        assert all(x <= MAX_SHRINK * y for x, y in zip(a, b)), (a, b)
    assert len(plan) == 1 or max(s / d for s, d in zip(src, dst)) > MAX_SHRINK  # one step whenever one will do


def test_a_3000x2000_background_on_an_odd_97x61_frame_is_close_to_one_exact_float64_resize():
    h, w = 2000, 3000
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    img = torch.stack([0.5 + 0.4 * torch.sin(xx / 170) * torch.cos(yy / 130),  # smooth waves,
                       ((xx // 60 + yy // 60) % 2) * 0.8 + 0.1,  # 60 px squares: two output pixels each,
                       (xx / w) * (yy / h)])[None]  # a ramp
    noise = torch.rand(img.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    img = (img + 0.05 * noise).clamp(0, 1)
    out = fit_background(img.float(), 61, 97)  # 31x: 2000x3000 -> 520x776 -> 65x97, then the middle rows
    ref = F.interpolate(img, size=(65, 97), mode="bilinear", align_corners=False, antialias=True)[..., 2:63, :]
    d = (out.double() - ref).abs() * 255
    assert out.shape == (1, 3, 61, 97)
    assert d.max() < 2 and d.mean() < 0.3  # LSB of 8 bits
