"""YUV 4:2:0 frames on the device: the layout decoders give and encoders take.

Streams in this layout skip both RGB conversions on the host, carry half the bytes of RGB, and composite one
full-size plane plus two quarter-size ones instead of three full-size planes. Compositing is affine, so it is the
same in YUV code values as in RGB; only the background (colours, images) and the network's input are converted,
with the stream's own matrix and range.

Planes are float code values / 255: y (B,1,H,W) and uv (B,2,H/2,W/2).
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np
import torch

from .filters import half as half_size

# (Kr, Kb) of each matrix; green's weight is what is left.
_KRKB = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722), "bt2020": (0.2627, 0.0593)}
# AVColorSpace -> matrix; unspecified and the rest fall back to BT.601, as swscale does.
_AVCOL_SPC = {1: "bt709", 9: "bt2020", 10: "bt2020"}


@dataclass(frozen=True)
class YUVSpec:
    matrix: str = "bt601"
    full_range: bool = False

    @classmethod
    def of(cls, colorspace: int = 0, color_range: int = 0) -> YUVSpec:
        """From FFmpeg's AVColorSpace and AVColorRange numbers (as PyAV frames and streams report them)."""
        return cls(_AVCOL_SPC.get(int(colorspace), "bt601"), int(color_range) == 2)

    def _scales(self) -> tuple[float, float, float]:
        """(luma offset, luma scale, chroma scale), all / 255."""
        if self.full_range:
            return 0.0, 1.0, 1.0
        return 16 / 255, 219 / 255, 224 / 255

    def rgb_matrix(self) -> list[list[float]]:
        """3x3 from RGB 0..1 to (Y, U, V) codes / 255, before the offsets (see ``rgb_to_yuv``)."""
        kr, kb = _KRKB[self.matrix]
        kg = 1 - kr - kb
        _, ys, cs = self._scales()
        return [[kr * ys, kg * ys, kb * ys],
                [-kr / (2 - 2 * kb) * cs, -kg / (2 - 2 * kb) * cs, 0.5 * cs],
                [0.5 * cs, -kg / (2 - 2 * kr) * cs, -kb / (2 - 2 * kr) * cs]]

    def offsets(self) -> tuple[float, float, float]:
        off, _, _ = self._scales()
        return off, 128 / 255, 128 / 255

    def color(self, rgb255) -> tuple[float, float, float]:
        """An RGB colour (0..255) as (Y, U, V) code values 0..255."""
        m = np.array(self.rgb_matrix()) @ (np.asarray(rgb255, dtype=np.float64) / 255) + self.offsets()
        return tuple(float(v) * 255 for v in np.clip(m, 0, 1))

    def black_white(self) -> tuple[float, float]:
        """Luma of black and white, / 255 (mask view)."""
        off, ys, _ = self._scales()
        return off, off + ys


def _mix(x: torch.Tensor, m: list[list[float]], offsets=(0.0, 0.0, 0.0)) -> torch.Tensor:
    # Python scalars rather than a 3x3 tensor: building one would be a blocking host->device copy.
    c = [x[:, i:i + 1] for i in range(3)]
    return torch.cat([c[0] * r[0] + c[1] * r[1] + c[2] * r[2] + o for r, o in zip(m, offsets)], 1)


def rgb_to_yuv(rgb: torch.Tensor, spec: YUVSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB (B,3,H,W) 0..1 with even H, W -> (y (B,1,H,W), uv (B,2,H/2,W/2)); chroma is the 2x2 mean."""
    yuv = _mix(rgb, spec.rgb_matrix(), spec.offsets())
    return yuv[:, :1].contiguous(), half_size(yuv[:, 1:])


def yuv_to_rgb(y: torch.Tensor, uv: torch.Tensor, spec: YUVSpec, size: tuple[int, int]) -> torch.Tensor:
    """Planes -> RGB (B,3,*size) 0..1; each plane is resized straight to `size` (antialiased when shrinking)."""
    from .preprocess import resize

    off, ys, cs = spec._scales()
    kr, kb = _KRKB[spec.matrix]
    kg = 1 - kr - kb
    half = (y.shape[-2] // 2, y.shape[-1] // 2)
    # The chroma keyer works at the chroma planes' size: a 2x2 mean is all the luma needs to get there.
    luma = (half_size(y) if tuple(size) == half else resize(y, size)).sub(off).mul_(1 / ys)
    chroma = resize(uv, size).sub(128 / 255).mul_(1 / cs)
    u, v = chroma[:, :1], chroma[:, 1:]
    r = luma + v * (2 - 2 * kr)
    b = luma + u * (2 - 2 * kb)
    g = luma - u * (kb * (2 - 2 * kb) / kg) - v * (kr * (2 - 2 * kr) / kg)
    return torch.cat([r, g, b], 1).clamp_(0, 1)


def to_planes(planes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-sized uint8 (Y, U, V) planes of B frames (strided views are fine) -> float y (B,1,H,W) and
    uv (B,2,H/2,W/2), code values / 255: one conversion pass straight from the decoder's memory."""
    y0, u0, _ = planes[0]
    b = len(planes)
    y = torch.empty((b, 1, *y0.shape), device=y0.device)
    uv = torch.empty((b, 2, *u0.shape), device=y0.device)
    for i, (py, pu, pv) in enumerate(planes):
        y[i, 0].copy_(py)
        uv[i, 0].copy_(pu)
        uv[i, 1].copy_(pv)
    return y.mul_(1 / 255), uv.mul_(1 / 255)


def pack_i420(y: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Float planes (B,1,H,W), (B,2,H/2,W/2) in 0..1 -> (B, 3H/2, W) uint8 I420, rounded.

    The planes must be within 0..1 (every compositing path keeps them there): values are not clamped."""
    b, _, h, w = y.shape
    out = torch.empty((b, h * w * 3 // 2), dtype=torch.uint8, device=y.device)
    n = h * w
    # Into the packed buffer directly; float -> uint8 truncates, so 0.5 + 255 x rounds. One fused op each: at
    # 720p the usual mul / add / clamp chain costs twice as much.
    half = torch.full((), 0.5, device=y.device)
    out[:, :n].copy_(torch.add(half, y, alpha=255).view(b, n))
    out[:, n:].copy_(torch.add(half, uv, alpha=255).view(b, -1))
    return out.view(b, -1, w)


def i420_planes(frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Y, U, V) uint8 planes of an av.VideoFrame (views of its memory when it is 4:2:0 already) or of a
    (3H/2, W) I420 array. Sizes must be even."""
    if isinstance(frame, av.VideoFrame):
        if frame.width % 2 or frame.height % 2:
            raise ValueError(f"a 4:2:0 stream needs even frame sizes, got {frame.width}x{frame.height}")
        if frame.format.name not in ("yuv420p", "yuvj420p"):
            frame = frame.reformat(format="yuv420p")
        return tuple(np.frombuffer(p, np.uint8, p.line_size * p.height).reshape(p.height, p.line_size)[:, :p.width]
                     for p in frame.planes[:3])
    a = np.asarray(frame)
    if a.dtype != np.uint8 or a.ndim != 2 or a.shape[0] % 3 or a.shape[1] % 2:
        raise ValueError(f"expected a uint8 (3H/2, W) I420 frame with even H and W, got {a.dtype} {a.shape}")
    h, w = a.shape[0] * 2 // 3, a.shape[1]
    flat = a.reshape(-1)
    n, q = h * w, h * w // 4
    return a[:h], flat[n:n + q].reshape(h // 2, w // 2), flat[n + q:].reshape(h // 2, w // 2)


def join_i420(planes) -> np.ndarray:
    """(Y, U, V) planes -> one (3H/2, W) I420 array (a copy)."""
    y = planes[0]
    return np.concatenate([np.ascontiguousarray(p).reshape(-1) for p in planes]).reshape(-1, y.shape[1])


def spec_of(frame) -> YUVSpec | None:
    """The matrix and range a decoded frame says it uses (yuvj formats are full range)."""
    if not isinstance(frame, av.VideoFrame):
        return None
    full = 2 if frame.format.name.startswith("yuvj") else int(frame.color_range)
    return YUVSpec.of(int(frame.colorspace), full)
