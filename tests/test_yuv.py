"""4:2:0 helpers against OpenCV (BT.601 limited, what browsers use) and swscale (through PyAV)."""

import av
import cv2
import numpy as np
import pytest
import torch

from rmbg_stream.engine.yuv import (
    YUVSpec,
    i420_planes,
    join_i420,
    pack_i420,
    rgb_to_yuv,
    spec_of,
    to_planes,
    yuv_to_rgb,
)

COLOURS = [(0, 177, 64), (200, 150, 120), (255, 255, 255), (0, 0, 0), (48, 80, 255), (255, 0, 0), (0, 255, 0),
           (0, 0, 255), (128, 128, 128), (250, 240, 10), (17, 3, 199), (90, 200, 220)]
BLOCK = 8  # patch side: a multiple of 2, so each chroma sample sees one colour


def patches(rows=3, cols=4, block=BLOCK):
    """uint8 RGB made of flat blocks, one per colour of COLOURS (cycled)."""
    img = np.empty((rows * block, cols * block, 3), np.uint8)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        img[r * block:(r + 1) * block, c * block:(c + 1) * block] = COLOURS[k % len(COLOURS)]
    return img


def split(i420):
    """(Y, U, V) of a (3H/2, W) I420 array, by the book."""
    h, w = i420.shape[0] * 2 // 3, i420.shape[1]
    flat = i420.reshape(-1)
    q = (h // 2) * (w // 2)
    return (flat[:h * w].reshape(h, w), flat[h * w:h * w + q].reshape(h // 2, w // 2),
            flat[h * w + q:].reshape(h // 2, w // 2))


def as_tensor(rgb):
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255


def swscale_i420(rgb, colorspace, color_range):
    f = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    return f.reformat(format="yuv420p", dst_colorspace=colorspace, dst_color_range=color_range)


def interior_mask(h, w, block=BLOCK, margin=2):
    """Pixels at least `margin` from a patch border (chroma interpolation blurs across borders)."""
    i, j = np.arange(h) % block, np.arange(w) % block
    ri = (i >= margin) & (i < block - margin)
    rj = (j >= margin) & (j < block - margin)
    return ri[:, None] & rj[None, :]


def test_spec_of_ffmpeg_numbers():
    assert YUVSpec.of() == YUVSpec("bt601", False)
    assert YUVSpec.of(1, 1) == YUVSpec("bt709", False)  # AVCOL_SPC_BT709, AVCOL_RANGE_MPEG
    assert YUVSpec.of(1, 2) == YUVSpec("bt709", True)  # AVCOL_RANGE_JPEG
    assert YUVSpec.of(5, 2) == YUVSpec("bt601", True)  # BT470BG
    assert YUVSpec.of(6, 0) == YUVSpec("bt601", False)  # SMPTE170M
    assert YUVSpec.of(9, 1) == YUVSpec("bt2020", False) and YUVSpec.of(10, 1) == YUVSpec("bt2020", False)
    assert YUVSpec.of(2, 2).matrix == "bt601"  # unspecified falls back to BT.601


def test_black_white():
    assert YUVSpec().black_white() == pytest.approx((16 / 255, 235 / 255))
    assert YUVSpec("bt709", True).black_white() == pytest.approx((0.0, 1.0))
    for spec in (YUVSpec(), YUVSpec("bt709"), YUVSpec("bt2020", True)):
        lo, hi = spec.black_white()
        assert spec.color((0, 0, 0))[0] == pytest.approx(lo * 255)
        assert spec.color((255, 255, 255))[0] == pytest.approx(hi * 255)
        # Greys are colourless in every matrix.
        assert spec.color((77, 77, 77))[1:] == pytest.approx((128, 128))


@pytest.mark.parametrize("rgb", COLOURS)
def test_color_matches_opencv_bt601_limited(rgb):
    px = np.full((2, 2, 3), rgb, np.uint8)
    ref = cv2.cvtColor(px, cv2.COLOR_RGB2YUV_I420).reshape(-1)[[0, 4, 5]].astype(float)
    got = np.array(YUVSpec().color(rgb))
    assert np.abs(got - ref).max() <= 1, (got, ref)


@pytest.mark.parametrize("rgb", COLOURS)
@pytest.mark.parametrize("spec,colorspace,color_range", [
    (YUVSpec("bt709", False), "ITU709", "MPEG"),
    (YUVSpec("bt709", True), "ITU709", "JPEG"),
    (YUVSpec("bt601", True), "ITU601", "JPEG"),
    (YUVSpec("bt601", False), "ITU601", "MPEG"),
])
def test_color_matches_swscale(rgb, spec, colorspace, color_range):
    px = np.full((2, 2, 3), rgb, np.uint8)
    ref = swscale_i420(px, colorspace, color_range).to_ndarray().reshape(-1)[[0, 4, 5]].astype(float)
    got = np.array(spec.color(rgb))
    assert np.abs(got - ref).max() <= 2, (got, ref)


def test_bt709_differs_from_bt601():
    # Guards against a matrix table that maps everything to one matrix: pure red is far apart in the two.
    a, b = YUVSpec("bt601").color((255, 0, 0)), YUVSpec("bt709").color((255, 0, 0))
    assert abs(a[0] - b[0]) > 15
    assert YUVSpec("bt2020").color((255, 0, 0)) != pytest.approx(b)


def test_rgb_to_yuv_matches_opencv():
    rgb = patches()
    y, uv = rgb_to_yuv(as_tensor(rgb), YUVSpec())
    h, w = rgb.shape[:2]
    assert y.shape == (1, 1, h, w) and uv.shape == (1, 2, h // 2, w // 2)
    ry, ru, rv = split(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420))
    assert np.abs(y[0, 0].numpy() * 255 - ry).max() <= 1
    assert np.abs(uv[0, 0].numpy() * 255 - ru).max() <= 1
    assert np.abs(uv[0, 1].numpy() * 255 - rv).max() <= 1


def test_rgb_to_yuv_bt709_limited_matches_swscale():
    rgb = patches(4, 6)
    y, uv = rgb_to_yuv(as_tensor(rgb), YUVSpec("bt709", False))
    ref = swscale_i420(rgb, "ITU709", "MPEG")
    assert spec_of(ref) == YUVSpec("bt709", False)  # the frame says what it was converted to
    ry, ru, rv = i420_planes(ref)
    assert np.abs(y[0, 0].numpy() * 255 - ry).max() <= 2
    # swscale's chroma downsampling is not a 2x2 box: compare chroma away from the patch borders.
    inside = interior_mask(*ru.shape, block=BLOCK // 2, margin=1)
    assert np.abs(uv[0, 0].numpy() * 255 - ru)[inside].max() <= 2
    assert np.abs(uv[0, 1].numpy() * 255 - rv)[inside].max() <= 2


def test_rgb_to_yuv_batches_and_averages_chroma():
    rgb = patches()
    batch = torch.cat([as_tensor(rgb), as_tensor(rgb[::-1, ::-1].copy())])
    y, uv = rgb_to_yuv(batch, YUVSpec())
    y0, uv0 = rgb_to_yuv(batch[:1], YUVSpec())
    y1, uv1 = rgb_to_yuv(batch[1:], YUVSpec())
    torch.testing.assert_close(y, torch.cat([y0, y1]))
    torch.testing.assert_close(uv, torch.cat([uv0, uv1]))
    # Chroma is the 2x2 mean of the full-resolution chroma: a 2x2 red/blue checker gives their average.
    px = np.zeros((2, 2, 3), np.uint8)
    px[0, 0] = px[1, 1] = (255, 0, 0)
    px[0, 1] = px[1, 0] = (0, 0, 255)
    _, uv = rgb_to_yuv(as_tensor(px), YUVSpec())
    red, blue = YUVSpec().color((255, 0, 0)), YUVSpec().color((0, 0, 255))
    np.testing.assert_allclose(uv[0, :, 0, 0].numpy() * 255, [(red[1] + blue[1]) / 2, (red[2] + blue[2]) / 2],
                               atol=1e-3)


@pytest.mark.parametrize("spec", [YUVSpec(), YUVSpec("bt601", True), YUVSpec("bt709"), YUVSpec("bt709", True),
                                  YUVSpec("bt2020")])
def test_round_trip_rgb_yuv_rgb(spec):
    rgb = patches(4, 6, block=16)
    h, w = rgb.shape[:2]
    y, uv = rgb_to_yuv(as_tensor(rgb), spec)
    # Through 8-bit code values, as a real frame would be.
    y, uv = (y * 255).round() / 255, (uv * 255).round() / 255
    back = yuv_to_rgb(y, uv, spec, (h, w))
    assert back.shape == (1, 3, h, w)
    inside = interior_mask(h, w, block=16, margin=3)
    err = np.abs(back[0].permute(1, 2, 0).numpy() * 255 - rgb)[inside]
    assert err.max() <= 2.5, err.max()
    # At the chroma planes' size (what the chroma keyer works at) too.
    small = yuv_to_rgb(y, uv, spec, (h // 2, w // 2))
    assert small.shape == (1, 3, h // 2, w // 2)
    inside = interior_mask(h // 2, w // 2, block=8, margin=2)
    err = np.abs(small[0].permute(1, 2, 0).numpy() * 255 - rgb[::2, ::2])[inside]
    assert err.max() <= 2.5, err.max()


def test_yuv_to_rgb_matches_opencv_decode():
    rgb = patches(4, 6, block=16)
    i420 = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)
    ref = cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)
    y, uv = to_planes([tuple(torch.from_numpy(p) for p in split(i420))])
    got = yuv_to_rgb(y, uv, YUVSpec(), rgb.shape[:2])[0].permute(1, 2, 0).numpy() * 255
    inside = interior_mask(*rgb.shape[:2], block=16, margin=3)
    assert np.abs(got - ref)[inside].max() <= 2


def test_yuv_to_rgb_shrinks_to_any_size():
    y = torch.full((2, 1, 40, 60), 126 / 255)
    uv = torch.full((2, 2, 20, 30), 128 / 255)
    out = yuv_to_rgb(y, uv, YUVSpec(), (32, 32))
    assert out.shape == (2, 3, 32, 32)
    # Limited-range mid grey: (126 - 16) / 219 * 255 = 128.08
    np.testing.assert_allclose(out.numpy() * 255, 128.08, atol=0.05)


def test_to_planes_from_strided_views_and_pack_round_trip():
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (36, 20), dtype=np.uint8) for _ in range(3)]  # H = 24: 24 x 20 frames
    planes = [tuple(torch.from_numpy(p.copy()) for p in split(f)) for f in frames]
    # Strided views, as i420_planes gives for padded decoder memory.
    padded = [tuple(torch.from_numpy(np.pad(p.numpy(), ((0, 0), (0, 12))))[:, :p.shape[1]] for p in pl)
              for pl in planes]
    assert not padded[0][0].is_contiguous()
    y, uv = to_planes(padded)
    assert y.shape == (3, 1, 24, 20) and uv.shape == (3, 2, 12, 10)
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y[1, 0].numpy() * 255, planes[1][0].numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(uv[2, 1].numpy() * 255, planes[2][2].numpy(), rtol=0, atol=1e-4)
    packed = pack_i420(y, uv)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 36, 20)
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(packed[i].numpy(), f)


def test_pack_i420_rounds_to_nearest_code():
    # In-range planes only (the contract: compositing keeps them in 0..1), including the float edges of 0 and 1.
    y = torch.tensor([[[[0.4, 0.6], [254.4, 254.6]]]]) / 255
    y[..., 0, 0] = -1e-6
    y[..., 1, 1] = 1 + 1e-6
    uv = torch.tensor([[[[127.5]], [[127.49]]]]) / 255
    out = pack_i420(y, uv)[0].numpy()
    assert out.shape == (3, 2)
    np.testing.assert_array_equal(out.reshape(-1), [0, 1, 254, 255, 128, 127])


def test_i420_planes_of_an_array_are_views():
    a = np.random.default_rng(1).integers(0, 256, (72, 64), dtype=np.uint8)
    planes = i420_planes(a)
    for got, ref in zip(planes, split(a)):
        np.testing.assert_array_equal(got, ref)
        assert np.shares_memory(got, a)
    np.testing.assert_array_equal(join_i420(planes), a)


def test_i420_planes_of_an_array_with_height_not_a_multiple_of_four():
    # 50 x 30 (and 480 x 270, a quarter of 1080p): even sizes, odd chroma height.
    a = np.random.default_rng(2).integers(0, 256, (45, 50), dtype=np.uint8)
    planes = i420_planes(a)
    assert [p.shape for p in planes] == [(30, 50), (15, 25), (15, 25)]
    for got, ref in zip(planes, split(a)):
        np.testing.assert_array_equal(got, ref)
    # The same frame wrapped by PyAV gives the same planes.
    for got, ref in zip(planes, i420_planes(av.VideoFrame.from_ndarray(a, format="yuv420p"))):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("bad", [np.zeros((36, 20), np.float32), np.zeros((36, 21), np.uint8),
                                 np.zeros((35, 20), np.uint8), np.zeros((24, 20, 3), np.uint8)])
def test_i420_planes_rejects_bad_arrays(bad):
    with pytest.raises(ValueError, match="I420"):
        i420_planes(bad)


@pytest.mark.parametrize("fmt", ["yuv420p", "yuvj420p"])
def test_i420_planes_of_a_420_video_frame(fmt):
    # Width 50: the decoder's rows are padded (line_size > width), the planes must be cut to the width.
    a = np.random.default_rng(3).integers(0, 256, (45, 50), dtype=np.uint8)
    frame = av.VideoFrame.from_ndarray(a, format=fmt)
    assert frame.planes[0].line_size > frame.width
    planes = i420_planes(frame)
    assert [p.shape for p in planes] == [(30, 50), (15, 25), (15, 25)]
    for got, ref in zip(planes, split(frame.to_ndarray())):
        np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(join_i420(planes), a)


def test_i420_planes_converts_other_formats():
    rgb = patches(4, 6)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    planes = i420_planes(frame)
    ref = frame.reformat(format="yuv420p").to_ndarray()
    for got, want in zip(planes, split(ref)):
        np.testing.assert_array_equal(got, want)
    # and the conversion is BT.601 limited, like OpenCV's (chroma compared away from the patch borders)
    inside = interior_mask(*planes[1].shape, block=BLOCK // 2, margin=1)
    for got, want, m in zip(planes, split(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420)), (None, inside, inside)):
        diff = np.abs(got.astype(int) - want)
        assert (diff if m is None else diff[m]).max() <= 2


@pytest.mark.parametrize("size", [(51, 30), (50, 31), (3, 3)])
def test_i420_planes_rejects_odd_video_frames(size):
    w, h = size
    frame = av.VideoFrame(w, h, "yuv420p")
    with pytest.raises(ValueError, match="even"):
        i420_planes(frame)
    with pytest.raises(ValueError, match="even"):
        i420_planes(av.VideoFrame(w, h, "rgb24"))


def test_spec_of_frames():
    a = np.zeros((36, 20), np.uint8)
    assert spec_of(a) is None
    j = av.VideoFrame.from_ndarray(a, format="yuvj420p")
    assert spec_of(j) == YUVSpec("bt601", True)  # yuvj is full range even when untagged
    assert int(j.color_range) != 2
    f = av.VideoFrame.from_ndarray(a, format="yuv420p")
    assert spec_of(f) == YUVSpec("bt601", False)
    f.colorspace, f.color_range = 1, 2
    assert spec_of(f) == YUVSpec("bt709", True)
    f.colorspace, f.color_range = 9, 1
    assert spec_of(f) == YUVSpec("bt2020", False)
