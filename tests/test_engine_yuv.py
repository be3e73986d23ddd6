"""4:2:0 streams through the engine (CPU, chroma keyer): I420 in, I420 out, in the frame's own matrix and range."""

import av
import cv2
import numpy as np
import pytest
import torch

from rmbg_stream.engine.backends import create_backend
from rmbg_stream.engine.composite import parse_background
from rmbg_stream.engine.engine import Engine, StreamOptions
from rmbg_stream.engine.yuv import YUVSpec, i420_planes
from rmbg_stream.server.synthetic import FOREGROUND, KEY, GreenScreen, read_stamp

from .test_engine import interior

CPU = torch.device("cpu")
W, H = 320, 240
BG = (48, 80, 255)  # "#3050ff"


@pytest.fixture
def engine():
    with Engine(create_backend("chroma", CPU), max_batch=4, max_wait_ms=2) as e:
        yield e


def screen_frame(n=0):
    return GreenScreen(W, H).frame(n)


def key_chroma():
    px = cv2.cvtColor(np.full((2, 2, 3), KEY, np.uint8), cv2.COLOR_RGB2YUV_I420).reshape(-1)
    return int(px[4]), int(px[5])


def truth(i420):
    """The true alpha (0 / 255) of a GreenScreen frame: background where the chroma is the key's."""
    _, u, v = i420_planes(i420)
    ku, kv = key_chroma()
    key = np.repeat(np.repeat((u == ku) & (v == kv), 2, 0), 2, 1)
    return np.where(key, 0, 255).astype(np.uint8)


def box(i420):
    """Where the foreground box (RGB FOREGROUND) is, at full size."""
    _, u, v = i420_planes(i420)
    fu, fv = cv2.cvtColor(np.full((2, 2, 3), FOREGROUND, np.uint8), cv2.COLOR_RGB2YUV_I420).reshape(-1)[[4, 5]]
    return np.repeat(np.repeat((u == fu) & (v == fv), 2, 0), 2, 1)


def to_rgb(i420):
    return cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)


def run(engine, frame, pixel_format="yuv420p", spec=None, **options):
    options.setdefault("smoothing", 0.0)
    if isinstance(options.get("background"), str):
        options["background"] = parse_background(options["background"])
    s = engine.open_stream(live=False, options=StreamOptions(**options), pixel_format=pixel_format, spec=spec)
    s.submit(frame)
    r = s.get(timeout=10)
    s.close()
    return r


def test_colour_background_on_yuv_stream_matches_rgb_stream(engine):
    f = screen_frame(3)
    fg, bg = interior(truth(f), margin=3)
    inside_box, _ = interior(box(f).astype(np.uint8) * 255, margin=3)
    assert bg.sum() > 1000 and inside_box.sum() > 1000

    r = run(engine, f, background="#3050ff", alpha=True)
    assert r.format == "yuv420p" and r.image.shape == (H * 3 // 2, W) and r.image.dtype == np.uint8
    assert np.all(r.alpha[fg] == 255) and np.all(r.alpha[bg] == 0)
    rgb = to_rgb(r.image)
    assert np.abs(rgb[bg].astype(int) - BG).max() <= 3
    assert np.abs(rgb[inside_box].astype(int) - FOREGROUND).max() <= 3
    # The foreground's code values pass through untouched.
    np.testing.assert_array_equal(r.image[:H][fg], f[:H][fg])
    assert read_stamp(r.image[:H]) == 3  # the black / white stamp blocks are kept as foreground

    ref = run(engine, to_rgb(f), pixel_format="rgb24", background="#3050ff", alpha=True)
    assert ref.format == "rgb24"
    diff = np.abs(ref.image.astype(int) - rgb)
    assert diff[fg | bg].max() <= 3
    assert diff.mean() < 1.5  # edges differ a little: the yuv path keys at the chroma planes' size


def test_yuv_stream_uses_the_frames_own_matrix(engine):
    f = screen_frame()
    fg, bg = interior(truth(f), margin=3)
    frame = av.VideoFrame.from_ndarray(f, format="yuv420p")
    frame.colorspace, frame.color_range = 1, 1  # BT.709, limited
    r = run(engine, frame, background="#3050ff")
    want = np.round(YUVSpec("bt709").color(BG)).astype(int)
    y, u, v = i420_planes(r.image)
    assert np.abs(y[bg].astype(int) - want[0]).max() <= 1
    bg_half = bg[::2, ::2] & bg[1::2, 1::2]
    assert np.abs(u[bg_half].astype(int) - want[1]).max() <= 1
    assert np.abs(v[bg_half].astype(int) - want[2]).max() <= 1
    np.testing.assert_array_equal(y[fg], f[:H][fg])
    # BT.601 would have given a clearly different luma for this blue
    assert abs(YUVSpec("bt601").color(BG)[0] - want[0]) >= 3

    # An I420 array takes the spec given to submit / the stream, else BT.601 limited.
    r709 = run(engine, f, spec=YUVSpec("bt709"), background="#3050ff")
    np.testing.assert_array_equal(r709.image, r.image)
    r601 = run(engine, f, background="#3050ff")
    want601 = np.round(YUVSpec().color(BG)).astype(int)
    assert np.abs(r601.image[:H][bg].astype(int) - want601[0]).max() <= 1


def test_transparent_yuv_stream_passes_colour_and_gives_alpha(engine):
    f = screen_frame(5)
    t = truth(f)
    fg, bg = interior(t, margin=3)
    r = run(engine, f, background="transparent")
    assert r.format == "yuva420p"
    assert r.alpha is not None and r.alpha.shape == (H, W) and r.alpha.dtype == np.uint8
    assert np.all(r.alpha[bg] == 0) and np.all(r.alpha[fg] == 255)
    inside_box, _ = interior(box(f).astype(np.uint8) * 255, margin=2)
    assert inside_box.sum() > 8000 and np.all(r.alpha[inside_box] == 255)
    np.testing.assert_array_equal(r.image, f)


def test_mask_view_on_yuv_streams(engine):
    f = screen_frame()
    fg, bg = interior(truth(f), margin=3)
    r = run(engine, f, background="#3050ff", mask_view=True, alpha=True)
    assert r.format == "yuv420p"
    y, u, v = i420_planes(r.image)
    assert np.all(y[bg] == 16) and np.all(y[fg] == 235)
    assert np.all(u == 128) and np.all(v == 128)
    # Soft edges follow the alpha in limited range.
    assert np.abs(y.astype(int) - np.round(16 + r.alpha * (219 / 255))).max() <= 1

    # A full-range (yuvj) frame gets full-range black and white.
    r = run(engine, av.VideoFrame.from_ndarray(f, format="yuvj420p"), background="#3050ff", mask_view=True)
    y, u, _ = i420_planes(r.image)
    assert np.all(y[bg] == 0) and np.all(y[fg] == 255) and np.all(u == 128)


def submit_all_then_get(streams, frames):
    for s, f in zip(streams, frames):
        s.submit(f)
    return [s.get(timeout=10) for s in streams]


def test_yuv_streams_batched_together_equal_one_stream_alone():
    frames = [screen_frame(n) for n in (0, 7, 15, 30)]
    opts = StreamOptions(background=parse_background("#3050ff"), smoothing=0.0, alpha=True)
    # A long wait: the worker holds the first frame until every stream has one.
    with Engine(create_backend("chroma", CPU), max_batch=4, max_wait_ms=2000) as e:
        streams = [e.open_stream(live=False, options=opts, pixel_format="yuv420p") for _ in frames]
        batched = submit_all_then_get(streams, frames)
        assert e.batches == 1 and e.last_batch_size == 4
        for s in streams:
            s.close()
        alone = []
        for f in frames:
            s = e.open_stream(live=False, options=opts, pixel_format="yuv420p")
            alone.append(submit_all_then_get([s], [f])[0])
            s.close()
        assert e.last_batch_size == 1
    assert len({r.image.tobytes() for r in batched}) == 4  # the frames differ (the box moves), so must results
    for b, a in zip(batched, alone):
        np.testing.assert_array_equal(b.image, a.image)
        np.testing.assert_array_equal(b.alpha, a.alpha)


def test_batched_yuv_streams_keep_their_own_options_and_layouts():
    f = screen_frame(2)
    fg, bg = interior(truth(f), margin=3)
    f709 = av.VideoFrame.from_ndarray(f, format="yuv420p")
    f709.colorspace, f709.color_range = 1, 1
    cases = [  # (background, pixel format, frame, spec the output is in)
        ("#3050ff", "yuv420p", f, YUVSpec()),
        ("#ff0000", "yuv420p", f, YUVSpec()),
        ("#ff0000", "yuv420p", f709, YUVSpec("bt709")),
        ("#ffffff", "rgb24", to_rgb(f), None),
    ]
    with Engine(create_backend("chroma", CPU), max_batch=4, max_wait_ms=2000) as e:
        streams = [e.open_stream(live=False, options=StreamOptions(background=parse_background(b), smoothing=0.0),
                                 pixel_format=p) for b, p, _, _ in cases]
        results = submit_all_then_get(streams, [c[2] for c in cases])
        assert e.batches == 1 and e.last_batch_size == 4
    for (b, _, _, spec), r in zip(cases, results):
        colour = parse_background(b).color
        if spec is None:
            assert r.format == "rgb24"
            assert np.all(r.image[bg] == colour)
            continue
        assert r.format == "yuv420p"
        want = np.round(spec.color(colour)).astype(int)
        assert np.abs(r.image[:H][bg].astype(int) - want[0]).max() <= 1
        np.testing.assert_array_equal(r.image[:H][fg], f[:H][fg])
        if spec == YUVSpec():
            assert np.abs(to_rgb(r.image)[bg].astype(int) - colour).max() <= 3


def noisy_background(f, seed=0):
    """A GreenScreen frame with strong luma noise and mild chroma noise on the key area (still well inside the
    keyer's tolerance, so it stays background)."""
    g = f.copy()
    rng = np.random.default_rng(seed)
    key = truth(f) == 0
    g[:H][key] = np.clip(g[:H][key].astype(int) + rng.integers(-40, 41, int(key.sum())), 0, 255)
    key_half = key[::2, ::2]
    for plane in (g[H:H * 5 // 4].reshape(H // 2, W // 2), g[H * 5 // 4:].reshape(H // 2, W // 2)):
        plane[key_half] = plane[key_half].astype(int) + rng.integers(-6, 7, int(key_half.sum()))
    return g


def test_blur_background_on_yuv_stream(engine):
    f = screen_frame()
    g = noisy_background(f)
    fg, bg = interior(truth(f), margin=3)
    r = run(engine, g, background="blur")
    assert r.format == "yuv420p"
    assert r.image[:H][bg].std() < g[:H][bg].std() / 2  # the background got blurred
    _, u_in, v_in = i420_planes(g)
    _, u, v = i420_planes(r.image)
    bg_half = bg[::2, ::2] & bg[1::2, 1::2]
    assert u[bg_half].std() < u_in[bg_half].std() / 2 and v[bg_half].std() < v_in[bg_half].std() / 2  # chroma too
    assert np.abs(r.image[:H][fg].astype(int) - f[:H][fg]).max() <= 1
    inside_box, _ = interior(box(f).astype(np.uint8) * 255, margin=3)
    assert np.abs(to_rgb(r.image)[inside_box].astype(int) - FOREGROUND).max() <= 3


def test_decontaminate_on_yuv_stream(engine):
    f = screen_frame()
    fg, bg = interior(truth(f), margin=3)
    inside_box, _ = interior(box(f).astype(np.uint8) * 255, margin=3)
    r = run(engine, f, background="#3050ff", decontaminate=True)
    rgb = to_rgb(r.image)
    assert np.abs(rgb[bg].astype(int) - BG).max() <= 3
    assert np.abs(rgb[inside_box].astype(int) - FOREGROUND).max() <= 3
    assert np.abs(r.image[:H][fg].astype(int) - f[:H][fg]).max() <= 2
    # Blur and decontamination together.
    r = run(engine, noisy_background(f), background="blur", decontaminate=True)
    assert np.abs(to_rgb(r.image)[inside_box].astype(int) - FOREGROUND).max() <= 3


def shifted_key(f, du):
    """The frame with the key area's U moved by `du` codes (luma untouched: no motion for the smoother)."""
    g = f.copy()
    u = g[H:H * 5 // 4].reshape(H // 2, W // 2)
    ku, kv = key_chroma()
    v = g[H * 5 // 4:].reshape(H // 2, W // 2)
    key = (u == ku) & (v == kv)
    u[key] += du
    return g


def test_smoothing_on_yuv_stream_and_scene_cut(engine):
    f = screen_frame()
    g = shifted_key(f, 29)  # the keyer now sees the background as slightly (about 13%) opaque
    _, bg = interior(truth(f), margin=3)
    raw = run(engine, g, background="#3050ff", alpha=True).alpha[bg]
    assert 20 <= raw.min() and raw.max() <= 40 and raw.max() - raw.min() <= 1

    s = engine.open_stream(live=False, options=StreamOptions(background=parse_background("#3050ff"), smoothing=0.5,
                                                             alpha=True), pixel_format="yuv420p")
    got = []
    for frame in (f, f, g, g, g):
        s.submit(frame)
        got.append(s.get(timeout=10))
    assert all(r.format == "yuv420p" for r in got)
    np.testing.assert_array_equal(got[0].image, got[1].image)  # a still frame stays put
    assert np.all(got[1].alpha[bg] == 0)
    # At still pixels the new alpha gets weight 1 - 0.9 * 0.5: the soft change comes in gradually.
    steps = [float(r.alpha[bg].mean()) for r in got[2:]]
    assert abs(steps[0] - 0.55 * raw.mean()) <= 2
    assert steps[0] < steps[1] < steps[2] < raw.mean()

    # A completely different frame is a scene cut: its raw alpha passes, nothing of the past remains.
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:, : W // 2] = KEY
    rgb[:, W // 2:] = (230, 230, 30)
    cut = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
    s.submit(cut)
    after = s.get(timeout=10)
    s.close()
    fresh = run(engine, cut, background="#3050ff", alpha=True)
    np.testing.assert_array_equal(after.alpha, fresh.alpha)
    np.testing.assert_array_equal(after.image, fresh.image)
    assert np.all(after.alpha[:, : W // 2 - 4] == 0) and np.all(after.alpha[:, W // 2 + 4:] == 255)


def test_yuv_stream_with_height_not_a_multiple_of_four(engine):
    # 64 x 30: chroma planes 32 x 15.
    rgb = np.empty((30, 64, 3), np.uint8)
    rgb[:] = KEY
    rgb[6:24, 16:48] = FOREGROUND
    f = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
    assert f.shape == (45, 64)
    r = run(engine, f, background="#3050ff", alpha=True)
    assert r.image.shape == (45, 64)
    fg, bg = interior(truth(f), margin=3)
    assert np.all(r.alpha[fg] == 255) and np.all(r.alpha[bg] == 0)
    out = to_rgb(r.image)
    assert np.abs(out[bg].astype(int) - BG).max() <= 3
    assert np.abs(out[fg].astype(int) - FOREGROUND).max() <= 3


def test_bad_yuv_frames_are_rejected_and_engine_keeps_serving(engine):
    s = engine.open_stream(live=False, pixel_format="yuv420p",
                           options=StreamOptions(background=parse_background("#3050ff"), smoothing=0.0))
    with pytest.raises(ValueError, match=r"I420.*even"):
        s.submit(np.zeros((36, 21), np.uint8))  # odd width
    with pytest.raises(ValueError, match=r"I420.*even"):
        s.submit(np.zeros((35, 20), np.uint8))  # not 3H/2 rows
    with pytest.raises(ValueError, match="I420"):
        s.submit(np.zeros((24, 20, 3), np.uint8))  # an RGB frame
    with pytest.raises(ValueError, match="even frame sizes"):
        s.submit(av.VideoFrame(51, 30, "yuv420p"))
    assert s.submitted == 0
    s.submit(screen_frame())
    r = s.get(timeout=10)
    assert r.index == 0 and r.image.shape == (H * 3 // 2, W)
    s.close()
    with pytest.raises(ValueError, match="pixel_format"):
        engine.open_stream(live=False, pixel_format="nv12")


def test_network_backend_on_a_420_stream_beside_an_rgb_one():
    """A BiRefNet backend gets RGB at its resolution from either layout, in one batch; the alpha comes back at the
    frame size (guided upsampling on the luma) and both streams see nearly the same mask for the same picture."""
    torch.manual_seed(0)
    backend = create_backend("random:swin_v1_t", torch.device("cpu"), resolution=(64, 64))
    i420 = GreenScreen(320, 240).frame(5)
    rgb = cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)
    options = StreamOptions(background=parse_background("transparent"), smoothing=0.0, alpha=True)
    with Engine(backend, max_batch=2, max_wait_ms=2000) as engine:
        a = engine.open_stream(live=False, options=options, pixel_format="yuv420p")
        b = engine.open_stream(live=False, options=options)
        a.submit(i420)
        b.submit(rgb)
        ra, rb = a.get(timeout=120), b.get(timeout=120)
        assert engine.stats()["batches"] == 1
    assert ra.format == "yuva420p" and rb.format == "rgba"
    np.testing.assert_array_equal(ra.image, i420)  # transparent: the colour passes through untouched
    assert ra.alpha.shape == rb.alpha.shape == (240, 320)
    assert np.abs(ra.alpha.astype(int) - rb.alpha.astype(int)).max() <= 3
