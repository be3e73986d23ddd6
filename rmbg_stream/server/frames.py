"""Engine results -> I420 frames for the video encoders, and the colour-over-alpha "stacked" layout.

OpenCV does RGB -> I420 about ten times faster than the generic swscale path the encoders would otherwise take,
with the same BT.601 limited-range coefficients the browsers decode with.

Every size travels, odd ones included: the engine's 4:2:0 planes and OpenCV need even sizes, so an odd-sized frame
is padded by one replicated row or column on the way in (`even_planes`), and the padding is cut off again when the
frame is made for the encoder (`video_frame` with the real size). The chroma planes of an odd-sized 4:2:0 frame,
ceil(size / 2), are exactly those of the padded one, so nothing is resampled.
"""

from __future__ import annotations

import av
import cv2
import numpy as np

from ..media.i420 import i420_frame, split_i420

# Alpha travels as grey in the luma plane; limited range, so that the browser's YUV -> RGB gives back 0..255.
_ALPHA_TO_Y = np.round(16 + np.arange(256) * (219 / 255)).astype(np.uint8)


def pad_even(img: np.ndarray) -> np.ndarray:
    """(H, W, ...) -> (H + H % 2, W + W % 2, ...), the last row and column repeated; `img` itself when even."""
    h, w = img.shape[:2]
    if not (h % 2 or w % 2):
        return img
    return np.pad(img, ((0, h % 2), (0, w % 2)) + ((0, 0),) * (img.ndim - 2), mode="edge")


def even_planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Y, U, V) uint8 4:2:0 planes of a decoded frame of any size, padded to even sizes: Y (He, We), U and V
    (He/2, We/2), with He, We the size rounded up to even."""
    if frame.format.name not in ("yuv420p", "yuvj420p"):
        frame = frame.reformat(format="yuv420p")
    planes = [np.frombuffer(p, np.uint8, p.line_size * p.height).reshape(p.height, p.line_size)[:, :p.width]
              for p in frame.planes[:3]]
    return pad_even(planes[0]), planes[1], planes[2]


def rgb_to_i420(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3He/2, We) I420 of it padded to even sizes (`video_frame` cuts the padding off)."""
    return cv2.cvtColor(np.ascontiguousarray(pad_even(rgb)), cv2.COLOR_RGB2YUV_I420)


def stacked_i420(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """I420 of a (2H, W) frame: the colour on top, the alpha as grey below, chroma neutral there. For an odd W the
    array is a column wider; make the frame with `video_frame(..., width=W)`."""
    return stack_i420(rgb_to_i420(rgb), alpha, rgb.shape[0])


def stack_i420(top: np.ndarray, alpha: np.ndarray, height: int | None = None) -> np.ndarray:
    """`stacked_i420` from the colour already in I420: `top` (3He/2, We) and `alpha` (H, W) or padded, uint8; the
    picture is the top `height` rows (default He). Returns (3H, We): a 2H x We frame.

    With an odd H, one chroma row spans the last colour row and the first alpha row: it is made neutral, so that
    the alpha, which the page reads from the red channel, stays exact."""
    y, u, v = split_i420(top)
    h = height or y.shape[0]
    w = y.shape[1]
    out = np.empty((3 * h, w), np.uint8)  # a 2H x W I420 frame holds 3H rows
    flat = out.reshape(-1)
    luma, chroma = 2 * h * w, h * (w // 2)
    flat[:luma].reshape(2 * h, w)[:h] = y[:h]
    flat[:luma].reshape(2 * h, w)[h:] = _ALPHA_TO_Y[pad_even(alpha)[:h, :w]]
    for i, src in enumerate((u, v)):  # the top half of each from the colour frame, the rest neutral
        plane = flat[luma + i * chroma : luma + (i + 1) * chroma].reshape(h, w // 2)
        plane[:] = 128
        plane[: h // 2] = src[: h // 2]
    return out


def video_frame(i420: np.ndarray, width: int | None = None, height: int | None = None) -> av.VideoFrame:
    """A yuv420p frame of (3H/2, W) I420, cut to `width` x `height` when the array was padded to even sizes."""
    return i420_frame(i420, width, height)


def split_rgba(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return image[:, :, :3], image[:, :, 3]
