"""Engine results -> I420 frames for the video encoders, and the colour-over-alpha "stacked" layout.

OpenCV does RGB -> I420 about ten times faster than the generic swscale path the encoders would otherwise take,
with the same BT.601 limited-range coefficients the browsers decode with.
"""

from __future__ import annotations

import av
import cv2
import numpy as np

# Alpha travels as grey in the luma plane; limited range, so that the browser's YUV -> RGB gives back 0..255.
_ALPHA_TO_Y = np.round(16 + np.arange(256) * (219 / 255)).astype(np.uint8)


def _even(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return img[: h & ~1, : w & ~1]


def rgb_to_i420(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(_even(rgb)), cv2.COLOR_RGB2YUV_I420)


def stacked_i420(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """I420 of a (2H, W) frame: the colour on top, the alpha as grey below, chroma neutral there."""
    return stack_i420(rgb_to_i420(rgb), alpha)


def stack_i420(top: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """`stacked_i420` from the colour already in I420."""
    alpha = _even(alpha)
    h, w = alpha.shape
    luma, chroma = h * w, (h // 2) * (w // 2)
    out = np.empty((3 * h, w), np.uint8)  # a 2H x W I420 frame holds 3H rows
    flat, src = out.reshape(-1), top.reshape(-1)
    flat[:luma] = src[:luma]
    flat[luma : 2 * luma] = _ALPHA_TO_Y[alpha].reshape(-1)
    for plane in range(2):  # U then V: the top half of each from the colour frame, the bottom half neutral
        dst, s = 2 * luma + plane * 2 * chroma, luma + plane * chroma
        flat[dst : dst + chroma] = src[s : s + chroma]
        flat[dst + chroma : dst + 2 * chroma] = 128
    return out


def video_frame(i420: np.ndarray) -> av.VideoFrame:
    # Wraps the array without a copy; the frame keeps it alive until the encoder is done with it.
    return av.VideoFrame.from_numpy_buffer(np.ascontiguousarray(i420), format="yuv420p")


def split_rgba(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return image[:, :, :3], image[:, :, 3]
