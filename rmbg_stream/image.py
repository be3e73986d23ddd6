"""`rmbg-stream image`: cut out still images (files or folders) with one loaded model."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .engine import composite
from .engine.preprocess import resize, to_tensor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def collect_inputs(inputs: list[str]) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(item)
    return files


def output_path(src: Path, out: Path, single: bool, suffix: str) -> Path:
    if single and out.suffix.lower() in IMAGE_SUFFIXES:
        return out
    return out / (src.stem + suffix)


def save_atomic(image: Image.Image, dest: Path) -> None:
    """Write beside the target and rename, so a failure never leaves a half-written file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}-", suffix=dest.suffix, dir=dest.parent)
    os.close(fd)
    try:
        image.save(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@torch.inference_mode()
def predict_alpha(backend, rgb: np.ndarray) -> torch.Tensor:
    """(1,1,H,W) alpha for one HxWx3 uint8 image: resize to the model, run, resize back (bilinear)."""
    x = to_tensor([rgb], backend.device)
    size = backend.resolution or tuple(x.shape[-2:])
    alpha = backend(resize(x, size))
    return resize(alpha, tuple(x.shape[-2:])).clamp_(0, 1), x


def cut_out(backend, rgb: np.ndarray, mode: str, background) -> Image.Image:
    alpha, frame = predict_alpha(backend, rgb)
    if mode == "mask":
        out = composite.to_uint8(alpha)[0, 0]
        return Image.fromarray(out.cpu().numpy(), "L")
    if background is None:
        out = composite.to_uint8(composite.to_rgba(frame, alpha))[0]
        return Image.fromarray(out.permute(1, 2, 0).cpu().numpy(), "RGBA")
    H, W = rgb.shape[:2]
    if background.kind == "color":
        comp = composite.composite_color(frame, alpha, background.color)
    elif background.kind == "image":
        bg = np.asarray(Image.open(background.path).convert("RGB"))
        comp = composite.composite_image(frame, alpha, composite.prepare_background(bg, H, W, frame.device))
    elif background.kind == "blur":
        comp = composite.composite_blur(frame, alpha, background.strength)
    else:
        raise ValueError(f"background {background.kind!r} is not available for still images")
    out = composite.to_uint8(comp)[0]
    return Image.fromarray(out.permute(1, 2, 0).cpu().numpy(), "RGB")


def run(backend, inputs: list[str], out: str, mask: bool = False, background=None) -> int:
    """Process every input; returns the number of failures (each reported as one line on stderr)."""
    files = collect_inputs(inputs)
    if not files:
        print("error: no input images found", file=sys.stderr)
        return 1
    out_path = Path(out)
    single = len(files) == 1 and not Path(inputs[0]).is_dir()
    suffix = ".png" if background is None or mask else ".jpg"
    failures = 0
    for src in files:
        try:
            with Image.open(src) as im:
                rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            print(f"error: {src}: cannot read image ({exc.__class__.__name__}: {exc})", file=sys.stderr)
            failures += 1
            continue
        dest = output_path(src, out_path, single, suffix)
        result = cut_out(backend, rgb, "mask" if mask else "cutout", background)
        if result.mode == "RGBA" and dest.suffix.lower() in {".jpg", ".jpeg"}:
            dest = dest.with_suffix(".png")
        save_atomic(result, dest)
        print(f"{src} -> {dest}")
    return failures
