"""The chroma keyer on colours a camera really sends: out-of-gamut 4:2:0 chroma (Chromium's fake camera) and a
green that is not the textbook one (``chroma:auto``)."""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest
import torch

from rmbg_stream.engine.backends import ChromaBackend, create_backend
from rmbg_stream.engine.composite import parse_background
from rmbg_stream.engine.engine import Engine, StreamOptions
from rmbg_stream.engine.yuv import i420_planes

from .test_engine import interior

CPU = torch.device("cpu")
BG = (48, 80, 255)
SUBJECT = (200, 150, 120)


def run(backend, frames, pixel_format: str) -> list:
    """Every frame through a file stream onto BG with its alpha; the results in order."""
    with Engine(backend, max_batch=4, max_wait_ms=2) as engine:
        opts = StreamOptions(background=parse_background("#3050ff"), smoothing=0.0, alpha=True)
        s = engine.open_stream(live=False, options=opts, pixel_format=pixel_format)
        out = []
        for f in frames:
            s.submit(f)
            out.append(s.get(timeout=10))
        s.close()
    return out


def fake_camera_frame(w: int, h: int) -> tuple[av.VideoFrame, np.ndarray]:
    """What Chromium's fake camera sends over WebRTC (measured on the server): Y=17, U=V=6, limited-range BT.601,
    a green no RGB colour has; a grey-ish subject box in the middle. Returns the frame and the subject mask."""
    i420 = np.empty((h * 3 // 2, w), np.uint8)
    i420[:h], i420[h:] = 17, 6
    subject = np.zeros((h, w), bool)
    subject[h // 4 : h // 4 + h // 2 & ~1, w // 4 : w // 4 + w // 2 & ~1] = True
    box = i420_planes(cv2.cvtColor(np.full((h, w, 3), SUBJECT, np.uint8), cv2.COLOR_RGB2YUV_I420))
    half = subject[::2, ::2]
    for plane, value, mask in zip(i420_planes(i420), box, (subject, half, half)):  # views into i420
        plane[mask] = value[0, 0]
    frame = av.VideoFrame.from_ndarray(i420, format="yuv420p")
    frame.colorspace, frame.color_range = 2, 1  # as aiortc's VP8 decoder hands them over: unspecified, limited
    return frame, subject


@pytest.mark.parametrize("size", [(202, 146), (640, 480)])
def test_chromium_fake_camera_green_is_keyed_on_a_yuv_stream(size):
    frame, subject = fake_camera_frame(*size)
    (r,) = run(ChromaBackend(CPU), [frame], "yuv420p")
    fg, bg = interior(subject.astype(np.uint8) * 255, margin=3)
    assert np.all(r.alpha[bg] == 0) and np.all(r.alpha[fg] == 255)
    rgb = cv2.cvtColor(r.image, cv2.COLOR_YUV2RGB_I420)
    assert np.abs(rgb[bg].astype(int) - BG).max() <= 3
    assert np.abs(rgb[fg].astype(int) - SUBJECT).max() <= 3


def screen(w: int, h: int, green, n: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB frame of `green` with a subject box that moves with `n` and touches the bottom edge; its mask."""
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = green
    subject = np.zeros((h, w), bool)
    x0 = w // 4 + n * 3
    subject[h // 3 :, x0 : x0 + w // 3] = True
    rgb[subject] = SUBJECT
    return rgb, subject


DARK_GREEN = (34, 96, 40)  # a dim, unevenly lit screen: far from the default key


def test_default_key_leaves_a_dim_green_screen_alone():
    rgb, _ = screen(161, 97, DARK_GREEN, 0)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    assert ChromaBackend(CPU)(x).min() == 1  # the reason for chroma:auto


@pytest.mark.parametrize("pixel_format", ["rgb24", "yuv420p"])
def test_chroma_auto_learns_a_dark_green_from_the_frame_borders(pixel_format):
    w, h = (161, 97) if pixel_format == "rgb24" else (202, 118)  # odd; 4:2:0 needs even, not multiples of 4
    frames = [screen(w, h, DARK_GREEN, n) for n in range(20)]
    backend = create_backend("chroma:auto", CPU)
    assert backend.key is None
    data = [f if pixel_format == "rgb24" else cv2.cvtColor(f, cv2.COLOR_RGB2YUV_I420) for f, _ in frames]
    if pixel_format == "yuv420p":
        data = [np.ascontiguousarray(d) for d in data]
    results = run(backend, data, pixel_format)
    assert np.abs(np.subtract(backend.key, DARK_GREEN)).max() <= 3  # the subject on the bottom edge is ignored
    for r, (_, subject) in zip(results, frames):
        fg, bg = interior(subject.astype(np.uint8) * 255, margin=3)
        assert np.all(r.alpha[bg] == 0) and np.all(r.alpha[fg] == 255)
        rgb = r.image if pixel_format == "rgb24" else cv2.cvtColor(r.image, cv2.COLOR_YUV2RGB_I420)
        assert np.abs(rgb[bg].astype(int) - BG).max() <= 3
        assert np.abs(rgb[fg].astype(int) - SUBJECT).max() <= 3


def test_chroma_auto_stops_learning_after_its_first_frames():
    backend = ChromaBackend(CPU, key=None, learn_frames=3)
    green = torch.tensor(DARK_GREEN, dtype=torch.float32).view(1, 3, 1, 1).expand(3, 3, 31, 45) / 255
    backend(green.contiguous())
    learned = backend.key
    blue = torch.tensor((20, 40, 200), dtype=torch.float32).view(1, 3, 1, 1).expand(2, 3, 31, 45) / 255
    alpha = backend(blue.contiguous())
    assert backend.key == learned and alpha.min() == 1  # a later blue screen is foreground, not a new key


GREEN_KEY = (0, 177, 64)
OLD_CONV = torch.tensor([[-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]).view(2, 3, 1, 1)


def alpha_f64(x: torch.Tensor, key_cbcr, tolerance: float = 0.12, softness: float = 0.08) -> torch.Tensor:
    """The keyer's alpha in float64, one pixel at a time as the formula says: the distance in the CbCr plane."""
    r, g, b = x.double().unbind(1)
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b - float(key_cbcr[0])
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b - float(key_cbcr[1])
    return ((cb**2 + cr**2).sqrt() - tolerance).div(softness).clamp(0, 1)[:, None]


def screen_batch(seed: int) -> torch.Tensor:
    """Two odd, non-square green-screen frames whose noise puts many pixels in the soft band of the key."""
    g = torch.Generator().manual_seed(seed)
    green = torch.tensor(GREEN_KEY, dtype=torch.float32).view(1, 3, 1, 1) / 255
    x = green + torch.randn(2, 3, 37, 53, generator=g) * 0.12
    x[:, :, 10:30, 15:40] = torch.rand(2, 3, 20, 25, generator=g)  # a subject of random colours
    return x.clamp(0, 1)


@pytest.mark.parametrize("auto", [False, True])
def test_the_key_distance_is_element_wise_maths_equal_to_a_float64_reference(auto):
    """ChromaBackend was a 1x1 conv2d, which CUDA may run in TF32 (about 3 LSB of alpha): element-wise maths now."""
    backend = ChromaBackend(CPU, key=None if auto else GREEN_KEY, learn_frames=2)
    x = screen_batch(3)
    alpha = backend(x)
    # The key's (Cb, Cr): learned (auto), or the colour's in float64.
    colour = torch.tensor(GREEN_KEY, dtype=torch.float64) / 255
    key = backend.key_cbcr.tolist() if auto else (OLD_CONV.view(2, 3).double() @ colour).tolist()
    want = alpha_f64(x, key)
    assert alpha.dtype == torch.float32 and alpha.shape == (2, 1, 37, 53)
    assert 0.05 < ((want > 0) & (want < 1)).double().mean() < 0.95  # the soft band is exercised
    torch.testing.assert_close(alpha.double(), want, atol=2e-6, rtol=0)
    old = torch.nn.functional.conv2d(x, OLD_CONV, -torch.tensor(key, dtype=torch.float32))  # what it was
    old = old.square().sum(1, keepdim=True).sqrt().sub(0.12).div(0.08).clamp(0, 1)
    torch.testing.assert_close(alpha, old, atol=2e-6, rtol=0)
