"""Still images in: the one place that opens, checks and decodes every picture the service reads.

The `image` command's inputs, IMAGE backgrounds (checked on the command line, then loaded by the engine) and the
server's background uploads all come through here, so they keep the same three promises:

- a decompression bomb (more pixels than PIL's ``Image.MAX_IMAGE_PIXELS``, 89 M by default) is refused with a
  one-line ``ImageError`` from its header alone, before anything is decoded;
- 16-bit grey (modes I;16, I;16B, I;16L, I;16N and I) is scaled to 8 bits, 65535 -> 255: ``convert("RGB")``
  clips those values instead, which turns any ordinary 16-bit photograph solid white. (16-bit RGB and RGBA
  files come out of PIL as 8-bit RGB/RGBA already, scaled properly);
- the picture comes out upright (EXIF orientation applied) as an (H, W, 3) uint8 RGB array, writable and
  C-contiguous.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL modes that hold more than 8 bits of grey per pixel, read as numbers in 0..65535.
WIDE_GREY = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class ImageError(ValueError):
    """One line: which picture, what is wrong with it (a ValueError, so the CLI prints it and exits 2)."""


class ImageTooLarge(ImageError):
    """More pixels than the decompression-bomb limit: refused before decoding."""


def _bomb(label: str, pixels: int | None = None) -> ImageTooLarge:
    size = f"{pixels} pixels, " if pixels else ""
    return ImageTooLarge(f"{label}: refused: the image declares {size}more than the {Image.MAX_IMAGE_PIXELS} pixels "
                      "allowed (a possible decompression bomb); scale it down first")


def open_image(source: str | Path | BinaryIO, label: str | None = None) -> Image.Image:
    """PIL's lazy open (header only, nothing decoded) with the pixel limit enforced; ImageError otherwise.

    `label` names the picture in messages (default: the path); pass one for in-memory data, whose repr says nothing.
    """
    label = label or str(source)
    try:
        with warnings.catch_warnings():
            # Above the limit PIL only warns (up to twice it, then raises): both are a refusal here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
    except Image.DecompressionBombError:
        raise _bomb(label) from None
    except FileNotFoundError:
        raise ImageError(f"{label}: cannot read image: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{label}: cannot read image: not a picture in a format Pillow knows") from None
    except OSError as exc:
        raise ImageError(f"{label}: cannot read image ({exc.strerror or exc})") from None
    except Exception as exc:  # a format plugin choking on a crafted header
        raise ImageError(f"{label}: cannot read image ({type(exc).__name__}: {exc})") from None
    if Image.MAX_IMAGE_PIXELS is not None and im.width * im.height > Image.MAX_IMAGE_PIXELS:
        im.close()
        raise _bomb(label, im.width * im.height)
    return im


def to_rgb(im: Image.Image, label: str = "image") -> np.ndarray:
    """An opened PIL image -> (H, W, 3) uint8 RGB, upright; 16-bit grey scaled, not clipped. ImageError if the
    data does not decode."""
    try:
        im = ImageOps.exif_transpose(im)
        if im.mode in WIDE_GREY:
            grey = np.asarray(im).astype(np.int64).clip(0, 65535)
            grey = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # rounded: 65535 -> 255, 32768 -> 128
            return np.repeat(grey[..., None], 3, axis=2)
        return np.array(im.convert("RGB"))  # np.array, not asarray: a writable copy the engine may wrap
    except Image.DecompressionBombError:  # a frame or tile past the first one can declare a larger size
        raise _bomb(label) from None
    except Exception as exc:  # decoders of untrusted files raise OSError, SyntaxError, ValueError, EOFError...
        raise ImageError(f"{label}: cannot read image ({type(exc).__name__}: {exc})") from None


def load_rgb(source: str | Path | BinaryIO, label: str | None = None) -> np.ndarray:
    """Open, check and decode: (H, W, 3) uint8 RGB, upright. Raises ImageError (one line) for anything else."""
    label = label or str(source)
    with open_image(source, label) as im:
        return to_rgb(im, label)
