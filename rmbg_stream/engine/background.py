"""What goes behind the foreground: `Background` and the `--background` strings that name one.

`parse_background` only parses: image and video paths are not opened here (the front ends check them before the
model loads, see `engine.setup.check_background`); compositing is `composite`'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")
# Green is the chroma-key green (0,255,0), not CSS's dark (0,128,0): that is what people key on.
COLOR_NAMES = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "red": (255, 0, 0),
    "gray": (128, 128, 128),
    "grey": (128, 128, 128),
}
DEFAULT_BLUR = 0.5
_FORMS = (
    "expected #rrggbb, #rgb, a colour name (white, black, green, blue, red, gray, or a CSS name), "
    f"blur, blur:<0..1>, transparent, none, or an image ({' '.join(IMAGE_EXTS)}) or video ({' '.join(VIDEO_EXTS)}) path"
)


@dataclass(frozen=True)
class Background:
    """What goes behind the foreground. kind: none | color | blur | transparent | image | video."""

    kind: str
    color: tuple[int, int, int] | None = None  # color: RGB 0..255
    strength: float | None = None  # blur: 0..1
    path: str | None = None  # image / video: not opened here


def _hex(text: str) -> tuple[int, int, int]:
    digits = text[1:]
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    if len(digits) != 6:
        raise ValueError
    return tuple(int(digits[i : i + 2], 16) for i in (0, 2, 4))


def _parse(text: str) -> Background:
    low = text.lower()
    if low == "none":
        return Background("none")
    if low == "transparent":
        return Background("transparent")
    if low == "blur" or low.startswith("blur:"):
        s = float(low[5:]) if low != "blur" else DEFAULT_BLUR
        if not 0.0 <= s <= 1.0:
            raise ValueError
        return Background("blur", strength=s)
    if low.startswith("#"):
        return Background("color", color=_hex(low))
    ext = os.path.splitext(low)[1]
    if ext in IMAGE_EXTS:
        return Background("image", path=text)
    if ext in VIDEO_EXTS:
        return Background("video", path=text)
    if low in COLOR_NAMES:
        return Background("color", color=COLOR_NAMES[low])
    from PIL import ImageColor  # CSS names beyond the table; raises ValueError for unknown ones

    return Background("color", color=tuple(ImageColor.getrgb(low)[:3]))


def parse_background(text: str) -> Background:
    """Parse a --background value; ValueError with a one-line list of the accepted forms otherwise."""
    try:
        return _parse(text.strip())
    except ValueError:
        raise ValueError(f"invalid background {text!r}: {_FORMS}") from None
