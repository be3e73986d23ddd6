"""Box, max and Gaussian filters, block and area means and bilinear resampling, shared by smoothing, compositing,
guided upsampling and the 4:2:0 path. Tensors are (..., h, w), any number of leading dims, float.

PyTorch's stride-1 pooling kernels are slow on the CPU (a 5-tap separable box over 640x480 takes ~15 ms, a
9-tap max ~19 ms), and so are its bilinear and area kernels on several channels (3-channel 120x160 -> 480x640:
~5 ms, against ~0.8 ms per single channel). On the CPU, float32 planes go through OpenCV: one call per (h, w)
plane, written straight into the output tensor's memory (`_per_plane`). Measured on the 2-core EPYC, one thread,
per plane: box r=2 at 256x256 ~0.1 ms (torch slices: 0.2), 4x upsampling to 640x480 ~0.17 ms (torch: 0.8), 2x2
means of 640x480 ~0.06 ms (slices: 0.23). OpenCV releases the GIL. Its own thread pool is made to follow torch's
intra-op thread count (`torch.set_num_threads`, which the front ends tune: one thread for the server on two
cores) before each use here: OpenCV's setting is process-wide, so its other users in the process (the server's
colour conversions) follow it too. Other
dtypes on the CPU keep the pure-torch code below it (shifted slices or a running sum; 2x2 means and 2x bilinear
written out); CUDA's kernels are fast and one launch per pass, so the GPU keeps them. Every OpenCV path computes
the same formula as the torch one, in float32 (box sums in float64): tests/test_filters.py holds them to each
other within 2e-6, or 3e-5 for resampling to arbitrary sizes (torch computes source coordinates in float32).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

_SHIFT_MAX_RADIUS = 8  # beyond this a running sum is cheaper than 2r+1 slice additions


def on_opencv(x: torch.Tensor) -> bool:
    """Whether `x` takes the OpenCV paths: a float32 CPU tensor with data, outside autograd."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad and x.numel() > 0


PlaneFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def match_threads() -> None:
    """OpenCV's thread count := torch's (see the module docstring): a stage on one torch thread stays on one core."""
    n = torch.get_num_threads()
    if cv2.getNumThreads() != n:
        cv2.setNumThreads(n)


def _per_plane(x: torch.Tensor, size: tuple[int, int], fn: PlaneFn) -> torch.Tensor:
    """`fn(src, dst)` on every (h, w) plane of float32 CPU `x` (..., h, w) -> a new (..., *size) tensor. `src` is a
    C-contiguous float32 2-D array, `dst` the output plane, which `fn` passes to OpenCV as ``dst=``; whatever it
    returns instead is copied there."""
    match_threads()
    h, w = x.shape[-2:]
    src = x.detach().contiguous().view(-1, h, w).numpy()
    out = torch.empty((*x.shape[:-2], *size), dtype=x.dtype)
    dst = out.view(-1, *size).numpy()
    for s, d in zip(src, dst):
        r = fn(s, d)
        if r.ctypes.data != d.ctypes.data:  # OpenCV allocated its own (it should not): keep the result anyway
            d[...] = r.reshape(d.shape)
    return out


def _pad(x: torch.Tensor, before: int, after: int, dim: int, value: float = 0.0) -> torch.Tensor:
    return F.pad(x, (before, after) if dim == -1 else (0, 0, before, after), value=value)


def _window_sum(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    if r <= _SHIFT_MAX_RADIUS:
        p = _pad(x, r, r, dim)
        out = p.narrow(dim, 0, n).clone()
        for i in range(1, 2 * r + 1):
            out += p.narrow(dim, i, n)
        return out
    # Running sum in float64: float32 would lose the small differences of large sums.
    c = _pad(x.double(), r + 1, r, dim).cumsum(dim)
    return (c.narrow(dim, 2 * r + 1, n) - c.narrow(dim, 0, n)).to(x.dtype)


@functools.lru_cache(maxsize=64)
def _norm(h: int, w: int, r: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """1 / the number of pixels of each (2r+1)^2 window that fall inside an h x w image."""
    def counts(n):
        i = torch.arange(n, device=device)
        return ((i + r).clamp(max=n - 1) - (i - r).clamp(min=0) + 1).to(dtype)

    return (counts(h).view(h, 1) * counts(w).view(1, w)).reciprocal_()


def box_blur(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 window, normalised by the pixels inside the image at the borders."""
    if r <= 0:
        return x
    if x.is_cuda:
        x = F.avg_pool2d(x, (1, 2 * r + 1), 1, (0, r), count_include_pad=False)
        return F.avg_pool2d(x, (2 * r + 1, 1), 1, (r, 0), count_include_pad=False)
    h, w = x.shape[-2:]
    if on_opencv(x):
        # Zero-padded window sums (OpenCV sums float32 in float64), then the in-image counts.
        k = (2 * r + 1, 2 * r + 1)
        s = _per_plane(x, (h, w), lambda a, d: cv2.boxFilter(a, -1, k, dst=d, normalize=False,
                                                                borderType=cv2.BORDER_CONSTANT))
    else:
        s = _window_sum(_window_sum(x, r, -1), r, -2)
    return s.mul_(_norm(h, w, r, x.device, s.dtype))


@functools.lru_cache(maxsize=16)
def _square(k: int) -> np.ndarray:
    return np.ones((k, k), np.uint8)


def max_filter(x: torch.Tensor, r: int) -> torch.Tensor:
    """Maximum over a (2r+1)^2 window (grey dilation)."""
    if r <= 0:
        return x
    if x.is_cuda:
        x = F.max_pool2d(x, (1, 2 * r + 1), 1, (0, r))
        return F.max_pool2d(x, (2 * r + 1, 1), 1, (r, 0))
    k = 2 * r + 1
    if on_opencv(x):
        # OpenCV's default border for a dilation is -inf: only in-image pixels count, as with max_pool2d.
        return _per_plane(x, tuple(x.shape[-2:]), lambda a, d: cv2.dilate(a, _square(k), dst=d))
    for dim in (-1, -2):
        n = x.shape[dim]
        # Doubling: after each step m[i] is the maximum of `width` samples from i, so a window of k takes
        # log2(k) + 1 passes instead of k.
        m, width = _pad(x, r, r, dim, float("-inf")), 1
        while width * 2 <= k:
            length = m.shape[dim] - width
            m, width = torch.maximum(m.narrow(dim, 0, length), m.narrow(dim, width, length)), width * 2
        if width < k:
            m = torch.maximum(m.narrow(dim, 0, n), m.narrow(dim, k - width, n))
        x = m.narrow(dim, 0, n)
    return x


def half(x: torch.Tensor) -> torch.Tensor:
    """2x2 mean (even sizes): the chroma grid of a 4:2:0 frame."""
    if x.is_cuda:
        return F.avg_pool2d(x, 2)
    h, w = x.shape[-2:]
    if on_opencv(x) and h % 2 == 0 and w % 2 == 0:
        return _per_plane(x, (h // 2, w // 2), lambda a, d: cv2.resize(a, (w // 2, h // 2), dst=d,
                                                                        interpolation=cv2.INTER_AREA))
    return (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]).mul_(0.25)


def _double(x: torch.Tensor, dim: int) -> torch.Tensor:
    # Bilinear x2 with half-pixel centres: each output sample is 3/4 of its source and 1/4 of the neighbour on its
    # side, edges repeated. Written straight into the interleaved output: no padded or stacked copies.
    n = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = 2 * n
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    even, odd = out.narrow(dim, 0, 2 * n).unfold(dim, 1, 2), out.narrow(dim, 1, 2 * n - 1).unfold(dim, 1, 2)
    even, odd = even.squeeze(-1), odd.squeeze(-1)
    torch.lerp(x.narrow(dim, 1, n - 1), x.narrow(dim, 0, n - 1), 0.25, out=even.narrow(dim, 1, n - 1))
    even.narrow(dim, 0, 1).copy_(x.narrow(dim, 0, 1))
    torch.lerp(x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1), 0.25, out=odd.narrow(dim, 0, n - 1))
    odd.narrow(dim, n - 1, 1).copy_(x.narrow(dim, n - 1, 1))
    return out


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 (as F.interpolate with align_corners=False), about twice as fast on the CPU."""
    if x.is_cuda:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    if on_opencv(x):
        return resize_bilinear(x, (2 * x.shape[-2], 2 * x.shape[-1]))
    return _double(_double(x, -1), -2)


def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (..., h, w) to `size` (h, w) without antialiasing, as F.interpolate(mode="bilinear",
    align_corners=False): for upsampling, and shrinks a plain bilinear sample is right for. Same size: `x`."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    if on_opencv(x) and size[0] >= x.shape[-2] and size[1] >= x.shape[-1]:
        dsize = (size[1], size[0])
        return _per_plane(x, size, lambda a, d: cv2.resize(a, dsize, dst=d, interpolation=cv2.INTER_LINEAR))
    lead = x.shape[:-2]
    # One channel per image: the CPU kernel is ~3x slower per pixel on 3-channel images than on 1-channel ones.
    flat = x.reshape(-1, 1, *x.shape[-2:]) if x.device.type == "cpu" else x
    return F.interpolate(flat, size=size, mode="bilinear", align_corners=False).view(*lead, *size)


def area(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area shrink of (..., h, w) to `size`, as F.interpolate(mode="area") (adaptive average pooling: output i
    averages inputs floor(i*h/n) .. ceil((i+1)*h/n)-1). On the CPU, sizes that divide exactly are block means in
    OpenCV (4 x 640x480 planes to 160x120: ~0.7 ms against ~2 ms); other ratios stay on torch's kernel."""
    size = (int(size[0]), int(size[1]))
    h, w = x.shape[-2:]
    if (h, w) == size:
        return x
    if on_opencv(x) and h % size[0] == 0 and w % size[1] == 0:
        dsize = (size[1], size[0])
        return _per_plane(x, size, lambda a, d: cv2.resize(a, dsize, dst=d, interpolation=cv2.INTER_AREA))
    lead = x.shape[:-2]
    return F.interpolate(x.reshape(-1, 1, h, w), size=size, mode="area").view(*lead, *size)


def _gaussian_taps(sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Normalised taps of a Gaussian, 3 sigma each side, made on `device`: a tensor built on the host would be a
    blocking host->device copy."""
    k = max(1, math.ceil(3 * sigma))
    t = torch.arange(-k, k + 1, device=device, dtype=dtype)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B,C,h,w), 3 sigma each side, edges repeated (replicate padding)."""
    g = _gaussian_taps(sigma, x.device, x.dtype)
    if on_opencv(x):
        taps = g.numpy()
        return _per_plane(x, tuple(x.shape[-2:]), lambda a, d: cv2.sepFilter2D(a, -1, taps, taps, dst=d,
                                                                              borderType=cv2.BORDER_REPLICATE))
    k, c = (g.numel() - 1) // 2, x.shape[1]
    x = F.conv2d(F.pad(x, (k, k, 0, 0), mode="replicate"), g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, k, k), mode="replicate"), g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def downscale(x: torch.Tensor, s: int) -> torch.Tensor:
    """Mean over s x s blocks, (h, w) -> (ceil(h/s), ceil(w/s)); edge blocks average the pixels they have.
    Non-overlapping windows are the one case where the CPU pooling kernel is as fast as anything else."""
    if s <= 1:
        return x
    return F.avg_pool2d(x, s, s, ceil_mode=True, count_include_pad=False)
