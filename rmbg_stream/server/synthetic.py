"""A synthetic green-screen camera for the live benchmark and the tests.

Each frame carries its number as black and white blocks in the top-left corner (a row of 16 bits, and below it the
same bits inverted as a check), so a frame that comes back processed can be matched to the moment it was sent. The
blocks are neither green nor soft, so the keyer keeps them as foreground and they survive any background.
"""

from __future__ import annotations

import asyncio
import fractions
import time

import cv2
import numpy as np
from aiortc import MediaStreamTrack

from .frames import video_frame

KEY = (0, 177, 64)  # the chroma backend's default key colour
BITS, BLOCK, ORIGIN = 16, 16, 16
FOREGROUND = (200, 150, 120)
CLOCK = 90000


def _yuv(rgb) -> tuple[int, int, int]:
    px = np.array([[rgb] * 2] * 2, np.uint8)
    i420 = cv2.cvtColor(px, cv2.COLOR_RGB2YUV_I420).reshape(-1)
    return int(i420[0]), int(i420[4]), int(i420[5])


class GreenScreen:
    """I420 frames (3H/2 x W arrays): key-green background, a foreground box gliding sideways, the stamp."""

    def __init__(self, width: int = 640, height: int = 480):
        if width < ORIGIN + BITS * BLOCK + 16 or height < 120 or width % 4 or height % 4:
            raise ValueError(f"synthetic frames need a width >= {ORIGIN + BITS * BLOCK + 16} and a height >= 120, "
                             "both multiples of 4")
        self.w, self.h = width, height
        y, u, v = _yuv(KEY)
        self.base = np.empty((height * 3 // 2, width), np.uint8)
        self.base[:height], self.base[height : height * 5 // 4], self.base[height * 5 // 4 :] = y, u, v
        # The stamp area is colourless: only its luma changes from frame to frame.
        for plane in self._chroma(self.base):
            plane[ORIGIN // 2 : ORIGIN // 2 + BLOCK, ORIGIN // 2 : (ORIGIN + BITS * BLOCK) // 2] = 128
        self.fg = _yuv(FOREGROUND)

    def _chroma(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.h, self.w
        return f[h : h * 5 // 4].reshape(h // 2, w // 2), f[h * 5 // 4 :].reshape(h // 2, w // 2)

    def frame(self, n: int) -> np.ndarray:
        f = self.base.copy()
        h, w = self.h, self.w
        bw, bh = w // 4, h // 2
        x0 = (w // 4 + int((w // 4) * np.sin(n / 15))) & ~1
        y0 = h // 3 & ~1
        y, u, v = self.fg
        f[y0 : y0 + bh, x0 : x0 + bw] = y
        for plane, value in zip(self._chroma(f), (u, v)):
            plane[y0 // 2 : (y0 + bh) // 2, x0 // 2 : (x0 + bw) // 2] = value
        bits = [(n >> (BITS - 1 - i)) & 1 for i in range(BITS)]
        for i, b in enumerate(bits):
            x = ORIGIN + i * BLOCK
            f[ORIGIN : ORIGIN + BLOCK, x : x + BLOCK] = 235 if b else 16
            f[ORIGIN + BLOCK : ORIGIN + 2 * BLOCK, x : x + BLOCK] = 16 if b else 235
        return f


def read_stamp(luma: np.ndarray) -> int | None:
    """The frame number from a (processed) frame's luma, or None when the check row does not match."""
    c = BLOCK // 4
    value = 0
    for i in range(BITS):
        x = ORIGIN + i * BLOCK + c
        top = luma[ORIGIN + c : ORIGIN + BLOCK - c, x : x + 2 * c].mean() > 128
        bottom = luma[ORIGIN + BLOCK + c : ORIGIN + 2 * BLOCK - c, x : x + 2 * c].mean() > 128
        if top == bottom:
            return None
        value = value << 1 | int(top)
    return value


class SyntheticTrack(MediaStreamTrack):
    """A camera at `fps`; `sent[n]` is when frame n left (monotonic)."""

    kind = "video"

    def __init__(self, width: int = 640, height: int = 480, fps: float = 30.0):
        super().__init__()
        self.source = GreenScreen(width, height)
        self.fps = fps
        self.n = -1
        self.t0: float | None = None
        self.sent: dict[int, float] = {}

    async def recv(self):
        self.n += 1
        if self.t0 is None:
            self.t0 = time.monotonic()
        due = self.t0 + self.n / self.fps
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        frame = video_frame(self.source.frame(self.n % (1 << BITS)))
        frame.pts = round(self.n * CLOCK / self.fps)
        frame.time_base = fractions.Fraction(1, CLOCK)
        self.sent[self.n % (1 << BITS)] = time.monotonic()
        return frame
