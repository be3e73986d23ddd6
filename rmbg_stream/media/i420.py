"""Packed I420 arrays -> ``av.VideoFrame``s of their true size, for every encoder (files and WebRTC).

PyAV 18.1's ``VideoFrame.from_numpy_buffer(a, format="yuv420p")`` takes the height as ``rows // 6 * 4``: a
(3H/2, W) array whose H is 2 mod 4 (480x270, 1280x534) becomes a frame 2 rows short with its chroma planes
misplaced, and a 2x2 frame (3 rows) fails with "Invalid argument". It also refuses odd array widths. So the
zero-copy wrap is used only where it is exact (H a multiple of 4); every other frame is made with its real size
and its planes copied in (1080p: 0.09 ms a frame here, timed over 100 frames; the encoder takes several ms).
"""

from __future__ import annotations

import av
import numpy as np


def split_i420(i420: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(3H/2, W) uint8 I420 with even H and W -> (Y (H,W), U (H/2,W/2), V (H/2,W/2)) views of it."""
    a = np.ascontiguousarray(i420)
    if a.dtype != np.uint8 or a.ndim != 2 or a.shape[0] % 3 or a.shape[1] % 2 or (a.shape[0] * 2 // 3) % 2:
        raise ValueError(f"expected a uint8 (3H/2, W) I420 array with even H and W, got {a.dtype} {a.shape}")
    h, w = a.shape[0] * 2 // 3, a.shape[1]
    flat, n, q = a.reshape(-1), h * w, (h // 2) * (w // 2)
    return a[:h], flat[n:n + q].reshape(h // 2, w // 2), flat[n + q:].reshape(h // 2, w // 2)


def planes_frame(y: np.ndarray, u: np.ndarray, v: np.ndarray, width: int, height: int) -> av.VideoFrame:
    """A new yuv420p frame of `width` x `height` from the top-left of uint8 planes at least (height, width) and
    (ceil(height/2), ceil(width/2)) in size (a copy)."""
    frame = av.VideoFrame(width, height, "yuv420p")
    for src, plane in zip((y, u, v), frame.planes):
        if src.shape[0] < plane.height or src.shape[1] < plane.width:
            raise ValueError(f"a {src.shape[1]}x{src.shape[0]} plane cannot fill a {plane.width}x{plane.height} one")
        dst = np.frombuffer(plane, np.uint8, plane.line_size * plane.height).reshape(plane.height, plane.line_size)
        dst[:, :plane.width] = src[:plane.height, :plane.width]
    return frame


def i420_frame(i420: np.ndarray, width: int | None = None, height: int | None = None) -> av.VideoFrame:
    """(3H/2, W) uint8 I420 (even H, W; planes packed) -> a yuv420p frame of `width` x `height` (default W x H).

    A smaller size takes the top-left part: that is how an odd-sized frame travels, padded to even sizes, since
    its chroma planes, ceil(size / 2), are then exactly the padded frame's. The frame may wrap `i420` without a
    copy, and keeps it alive until the encoder is done with it."""
    y, u, v = split_i420(i420)
    h, w = y.shape
    width, height = width or w, height or h
    if not (0 < width <= w and 0 < height <= h):
        raise ValueError(f"a {width}x{height} frame does not fit in a {w}x{h} I420 array")
    if height == h and h % 4 == 0:  # the one case from_numpy_buffer gets right (its width may be cropped)
        return av.VideoFrame.from_numpy_buffer(np.ascontiguousarray(i420), format="yuv420p", width=width)
    return planes_frame(y, u, v, width, height)
