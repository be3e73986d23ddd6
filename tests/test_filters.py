"""The CPU filters against PyTorch's pooling / interpolation kernels (what CUDA runs)."""

import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rmbg_stream.engine.filters import (
    area,
    box_blur,
    downscale,
    gaussian_blur,
    half,
    max_filter,
    resize_bilinear,
    upsample2x,
)

# (B, C, H, W): odd sizes, batches, several channels, and images smaller than the window.
SHAPES = [(1, 1, 17, 23), (3, 2, 31, 20), (2, 4, 8, 9), (1, 3, 1, 13), (1, 1, 11, 1), (2, 1, 3, 4)]
RADII = [1, 2, 8, 9, 20]


def rand(shape, seed=0, dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ref_box(x, r):
    x = F.avg_pool2d(x, (1, 2 * r + 1), 1, (0, r), count_include_pad=False)
    return F.avg_pool2d(x, (2 * r + 1, 1), 1, (r, 0), count_include_pad=False)


def ref_max(x, r):
    x = F.max_pool2d(x, (1, 2 * r + 1), 1, (0, r))
    return F.max_pool2d(x, (2 * r + 1, 1), 1, (r, 0))


def naive_box(x, r):
    """The definition: mean of the in-image pixels of each (2r+1)^2 window (numpy, float64)."""
    a = x.double().numpy()
    h, w = a.shape[-2:]
    out = np.empty_like(a)
    for i in range(h):
        for j in range(w):
            win = a[..., max(0, i - r):i + r + 1, max(0, j - r):j + r + 1]
            out[..., i, j] = win.mean(axis=(-2, -1))
    return out


def naive_max(x, r):
    a = x.numpy()
    h, w = a.shape[-2:]
    out = np.empty_like(a)
    for i in range(h):
        for j in range(w):
            out[..., i, j] = a[..., max(0, i - r):i + r + 1, max(0, j - r):j + r + 1].max(axis=(-2, -1))
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", RADII)
def test_box_blur_matches_avg_pool(shape, r):
    x = rand(shape, seed=r)
    got = box_blur(x, r)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, ref_box(x, r), rtol=0, atol=2e-6)
    np.testing.assert_allclose(got.double().numpy(), naive_box(x, r), rtol=0, atol=2e-6)


@pytest.mark.parametrize("r", [1, 8, 9, 20])
def test_box_blur_edges_are_means_of_in_image_pixels(r):
    # A constant image stays constant everywhere (the border normalisation counts only pixels inside the image),
    # and a single bright pixel spreads to exactly its window with weight 1 / (in-image window size).
    x = torch.full((1, 1, 13, 30), 0.7)
    torch.testing.assert_close(box_blur(x, r), x, rtol=0, atol=1e-6)
    d = torch.zeros(1, 1, 13, 30)
    d[0, 0, 0, 0] = 1.0
    got = box_blur(d, r)[0, 0]
    inside = (torch.arange(13)[:, None] <= r) & (torch.arange(30)[None, :] <= r)
    assert torch.all(got[~inside] == 0)
    # pixel (i, j) sees min(i+r,12)+1 rows and min(j+r,29)+1 columns of the image
    rows = (torch.arange(13) + r).clamp(max=12) + 1
    cols = (torch.arange(30) + r).clamp(max=29) + 1
    expect = 1 / (rows[:, None] * cols[None, :]).float()
    torch.testing.assert_close(got[inside], expect[inside], rtol=1e-5, atol=0)


def test_box_blur_large_radius_is_precise_on_long_rows():
    # The running-sum path (r > 8) sums in float64: a float32 prefix sum over 20000 samples would be off by far more
    # than float32 rounding of the result.
    x = rand((1, 1, 3, 20000), seed=3)
    got = box_blur(x, 20)
    assert (got.double() - ref_box(x.double(), 20)).abs().max() < 1e-6


def test_box_blur_radius_zero_is_identity_and_float64_input():
    x = rand((2, 3, 9, 7), seed=5)
    assert box_blur(x, 0) is x
    xd = x.double()
    got = box_blur(xd, 9)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref_box(xd, 9), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", RADII)
def test_max_filter_matches_max_pool(shape, r):
    x = rand(shape, seed=100 + r)
    got = max_filter(x, r)
    assert got.shape == x.shape
    torch.testing.assert_close(got, ref_max(x, r), rtol=0, atol=0)
    np.testing.assert_array_equal(got.numpy(), naive_max(x, r))


@pytest.mark.parametrize("r", [3, 4, 5, 7])
def test_max_filter_window_widths_that_are_not_powers_of_two(r):
    # The doubling scheme finishes with an overlapping step when 2r+1 is not a power of two: a single peak must
    # reach exactly r pixels each way, no further.
    x = torch.zeros(1, 1, 1, 41)
    x[..., 20] = 1
    got = max_filter(x, r)[0, 0, 0]
    assert got.nonzero().flatten().tolist() == list(range(20 - r, 21 + r))
    x = torch.zeros(1, 1, 41, 1) - 1  # negative values: the -inf padding must not leak in
    x[:, :, 20] = 0
    got = max_filter(x, r)[0, 0, :, 0]
    assert (got == 0).nonzero().flatten().tolist() == list(range(20 - r, 21 + r))
    assert torch.all(got[: 20 - r] == -1) and torch.all(got[21 + r:] == -1)


def test_max_filter_radius_zero_is_identity():
    x = rand((1, 2, 5, 6))
    assert max_filter(x, 0) is x


@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (2, 3, 10, 16), (3, 2, 48, 64), (1, 1, 2, 30)])
def test_half_matches_avg_pool(shape):
    x = rand(shape, seed=7)
    got = half(x)
    assert got.shape == (*shape[:2], shape[2] // 2, shape[3] // 2)
    torch.testing.assert_close(got, F.avg_pool2d(x, 2), rtol=0, atol=1e-6)


def test_half_is_the_chroma_grid_mean():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    np.testing.assert_allclose(half(x)[0, 0].numpy(), [[2.5, 4.5], [10.5, 12.5]])


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 1, 1, 5), (1, 1, 4, 1), (2, 3, 7, 9), (3, 1, 24, 32),
                                   (1, 2, 2, 2)])
def test_upsample2x_matches_interpolate(shape):
    x = rand(shape, seed=11)
    got = upsample2x(x)
    ref = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert got.shape == ref.shape == (*shape[:2], 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_upsample2x_does_not_touch_its_input_and_is_contiguous():
    x = rand((2, 2, 5, 6), seed=12)
    before = x.clone()
    got = upsample2x(x)
    assert torch.equal(x, before)
    assert got.is_contiguous()
    # A non-contiguous input (a channel slice) works the same.
    y = torch.cat([x, x], 1)[:, 1:3]
    torch.testing.assert_close(upsample2x(y), F.interpolate(y, scale_factor=2, mode="bilinear",
                                                            align_corners=False), rtol=0, atol=1e-6)


def test_box_blur_and_max_filter_on_non_contiguous_input():
    x = rand((2, 4, 19, 21), seed=13)[:, 1:3, :, ::2]
    for r in (2, 9):
        torch.testing.assert_close(box_blur(x, r), ref_box(x.contiguous(), r), rtol=0, atol=2e-6)
        torch.testing.assert_close(max_filter(x, r), ref_max(x.contiguous(), r), rtol=0, atol=0)


@pytest.mark.parametrize("s", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 1, 12, 16), (2, 3, 10, 7), (1, 2, 5, 5)])
def test_downscale_is_the_mean_of_each_block(s, shape):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(s))
    out = downscale(x, s)
    h, w = shape[-2:]
    assert out.shape[-2:] == (-(-h // s), -(-w // s))
    for i in range(out.shape[-2]):
        for j in range(out.shape[-1]):
            block = x[..., i * s:(i + 1) * s, j * s:(j + 1) * s]
            torch.testing.assert_close(out[..., i, j], block.mean((-1, -2)))


# Resampling and Gaussian blur: OpenCV on float32 CPU planes, torch's kernels for other dtypes and on CUDA.
RESIZES = [((17, 23), (40, 61)), ((61, 97), (479, 641)), ((256, 256), (479, 641)), ((1, 1), (3, 5)),
           ((5, 1), (5, 7)), ((31, 20), (31, 20)), ((31, 20), (17, 40)), ((480, 640), (256, 256))]


@pytest.mark.parametrize(("src", "dst"), RESIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resize_bilinear_matches_interpolate(src, dst, dtype):
    x = rand((2, 3, *src), seed=21, dtype=dtype)
    got = resize_bilinear(x, dst)
    ref = F.interpolate(x, size=dst, mode="bilinear", align_corners=False)
    assert got.shape == ref.shape and got.dtype == dtype and got.is_contiguous()
    # torch computes source coordinates in float32: against OpenCV's, the weights differ by ~1e-5 at most.
    torch.testing.assert_close(got, ref, rtol=0, atol=3e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize(("src", "dst"), [((480, 640), (120, 160)), ((479, 641), (256, 256)), ((720, 1280), (103, 183)),
                                          ((61, 97), (61, 97)), ((9, 12), (3, 4)), ((7, 5), (1, 1))])
def test_area_matches_interpolate(src, dst):
    x = rand((2, 4, *src), seed=22)
    got = area(x, dst)
    ref = F.interpolate(x, size=dst, mode="area")
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def ref_gaussian(x, sigma):
    k = max(1, math.ceil(3 * sigma))
    t = torch.arange(-k, k + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (k, k, 0, 0), mode="replicate"), g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, k, k), mode="replicate"), g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@pytest.mark.parametrize("shape", [(1, 4, 120, 160), (2, 3, 17, 23), (1, 2, 3, 40)])
@pytest.mark.parametrize("sigma", [0.4, 2.4, 3.9])
def test_gaussian_blur_is_the_replicate_padded_convolution(shape, sigma):
    x = rand(shape, seed=23)
    want = ref_gaussian(x.double(), sigma)
    torch.testing.assert_close(gaussian_blur(x, sigma).double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(gaussian_blur(x.double(), sigma), want, rtol=0, atol=1e-12)


def test_max_filter_in_float64_takes_the_torch_path_and_agrees():
    x = rand((2, 3, 19, 26), seed=24, dtype=torch.float64)
    torch.testing.assert_close(max_filter(x, 3), ref_max(x, 3), rtol=0, atol=0)


def test_opencv_follows_torchs_thread_count():
    before_torch, before_cv = torch.get_num_threads(), cv2.getNumThreads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            box_blur(rand((1, 1, 8, 9)), 1)
            assert cv2.getNumThreads() == n
    finally:
        torch.set_num_threads(before_torch)
        cv2.setNumThreads(before_cv)


def test_the_opencv_paths_leave_their_input_alone_and_take_strided_views():
    x = rand((2, 6, 17, 23), seed=25)
    before = x.clone()
    view = x[:, 1:4]
    for got, ref in ((box_blur(view, 2), ref_box(view, 2)), (max_filter(view, 2), ref_max(view, 2)),
                     (resize_bilinear(view, (40, 50)),
                      F.interpolate(view, size=(40, 50), mode="bilinear", align_corners=False))):
        torch.testing.assert_close(got, ref, rtol=0, atol=3e-5)
    assert torch.equal(x, before)
