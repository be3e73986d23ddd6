"""Rendering: a frame and its alpha at full size -> the output image and alpha of one stream's options.

Pure functions on device tensors, float 0..1 unless said: RGB frames (B,3,H,W); 4:2:0 frames as luma y (B,1,H,W)
and chroma uv (B,2,H/2,W/2) code values / 255, with alphas (B,1,H,W) and (B,1,H/2,W/2). Outputs are uint8:
{"image": RGB (B,H,W,3), RGBA (B,H,W,4) or I420 (B,3H/2,W), "alpha": (B,H,W)}. The one piece of state,
`BackgroundCache`, keeps a stream's prepared image background between frames.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import composite
from .yuv import YUVSpec, pack_i420, rgb_to_yuv

if TYPE_CHECKING:
    from .streams import StreamOptions, _Item

PER_STREAM = ("image", "video")  # background kinds read from each stream's own file or frame


def needs_background(o: StreamOptions) -> bool:
    """Whether rendering with `o` reads an image or video background."""
    return o.image and not o.mask_view and o.background.kind in PER_STREAM


def fill(o: StreamOptions, planes: list[tuple[torch.Tensor, torch.Tensor]], colours: list, backgrounds: list) -> list:
    """The background step of options `o` for each (planes, alpha at their size) pair: RGB is one pair, 4:2:0
    two (luma, chroma). `colours` and `backgrounds` give each pair its background colour values (0..255) and
    image."""
    kind = o.background.kind
    out = []
    for (x, alpha), colour, bg in zip(planes, colours, backgrounds):
        fg = composite.decontaminate(x, alpha) if o.decontaminate else x
        if kind == "color":
            out.append(composite.composite_color(fg, alpha, colour))
        elif kind in PER_STREAM:
            out.append(fg if bg is None else composite.composite_image(fg, alpha, bg))
        elif kind == "blur":
            out.append(composite.composite_blur(x, alpha, o.background.strength, fg=fg))
        elif kind == "transparent":
            out.append(fg)  # the alpha goes with it
        else:  # "none": the original frame
            out.append(x)
    return out


def render_rgb(frame: torch.Tensor, alpha: torch.Tensor, o: StreamOptions,
               bg: torch.Tensor | None) -> tuple[str, dict[str, torch.Tensor]]:
    """RGB frames (B,3,H,W) with options `o` (B > 1 only without image/video backgrounds) -> (format, outputs);
    `bg` (1,3,H,W): the image or video background, when `needs_background(o)`."""
    out = {}
    fmt = "rgb24"
    if o.image:
        if o.mask_view:
            parts = (alpha, alpha, alpha)
        else:
            (img,) = fill(o, [(frame, alpha)], [o.background.color], [bg])
            parts = (img,)
            if o.background.kind == "transparent":
                parts, fmt = (img, alpha), "rgba"  # as composite.to_rgba, interleaved in one pass
        out["image"] = composite.to_uint8_hwc(*parts)
    if o.alpha:
        out["alpha"] = composite.to_uint8(alpha)[:, 0]
    return fmt, out


def render_yuv(y: torch.Tensor, uv: torch.Tensor, alpha: torch.Tensor, alpha_half: torch.Tensor, o: StreamOptions,
               spec: YUVSpec, bg: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[str, dict[str, torch.Tensor]]:
    """The same as `render_rgb` on 4:2:0 planes in `spec`'s matrix and range: luma with the full alpha, chroma with
    the half-size one; `bg`: the background's (y, uv)."""
    out = {}
    fmt = "yuv420p"
    kind = o.background.kind
    if o.image:
        if o.mask_view:
            lo, hi = spec.black_white()
            y_out, uv_out = alpha * (hi - lo) + lo, torch.full_like(uv, 128 / 255)
        else:
            c = spec.color(o.background.color) if kind == "color" else (None,) * 3
            y_out, uv_out = fill(o, [(y, alpha), (uv, alpha_half)], [c[:1], c[1:]], bg or [None, None])
            fmt = "yuva420p" if kind == "transparent" else fmt
        out["image"] = pack_i420(y_out, uv_out)
    if o.alpha or (o.image and kind == "transparent" and not o.mask_view):
        out["alpha"] = composite.to_uint8(alpha)[:, 0]
    return fmt, out


def render(planes: tuple[torch.Tensor, ...], alpha: torch.Tensor, alpha_half: torch.Tensor | None, item: _Item,
           backgrounds: BackgroundCache) -> tuple[str, dict[str, torch.Tensor]]:
    """Renders `planes` ((frame,) RGB or (y, uv); `alpha_half` with 4:2:0 only) with `item`'s options, the image or
    video background taken from the stream's `backgrounds`."""
    o = item.options
    H, W = planes[0].shape[-2:]
    if alpha_half is None:
        bg = backgrounds.rgb(H, W, planes[0].device, item) if needs_background(o) else None
        return render_rgb(planes[0], alpha, o, bg)
    bg = backgrounds.yuv(H, W, planes[0].device, item) if needs_background(o) else None
    return render_yuv(planes[0], planes[1], alpha, alpha_half, o, item.spec, bg)


class BackgroundCache:
    """The last image background prepared for each layout, keyed by what it was made from, so a stale entry just
    misses after an options change. Video backgrounds are the item's own frame, prepared each time."""

    def __init__(self):
        self._rgb: tuple[tuple, torch.Tensor] | None = None
        self._yuv: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def missing(self, o: StreamOptions, H: int, W: int) -> bool:
        """Whether an image background in `o` has to be uploaded for an H x W frame: none prepared at that size."""
        return self._rgb is None or self._rgb[0] != (o.background.path, H, W)

    def rgb(self, H: int, W: int, device, item: _Item) -> torch.Tensor | None:
        """The item's image or video background as RGB (1,3,H,W) float 0..1, or None. Nothing is decoded or copied
        to the device here (the worker's thread): the engine uploaded what this needs into `item.background_dev`."""
        bg = item.options.background
        if bg.kind == "video" and item.background_dev is not None:
            return composite.fit_background(item.background_dev, H, W)
        if bg.kind == "image":
            key = (bg.path, H, W)
            cached = self._rgb
            if cached is None or cached[0] != key:
                if item.background_dev is None:
                    raise RuntimeError(f"background image {bg.path} was not uploaded for a {W}x{H} frame")
                cached = self._rgb = (key, composite.fit_background(item.background_dev, H, W))
            return cached[1]
        return None

    def yuv(self, H: int, W: int, device, item: _Item) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The same as (y (1,1,H,W), uv (1,2,H/2,W/2)) in the item's matrix and range, or None."""
        bg = item.options.background
        if bg.kind == "image":
            key = (bg.path, H, W, item.spec)
            cached = self._yuv
            if cached is None or cached[0] != key:
                cached = self._yuv = (key, rgb_to_yuv(self.rgb(H, W, device, item), item.spec))
            return cached[1]
        rgb = self.rgb(H, W, device, item)
        return None if rgb is None else rgb_to_yuv(rgb, item.spec)
