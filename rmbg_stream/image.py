"""`rmbg-stream image`: cut out still images (files or folders) with one loaded model."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .engine.composite import parse_background
from .engine.engine import Engine, StreamOptions

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


def run(backend, inputs: list[str], out: str, mask: bool = False, background=None) -> int:
    """Process every input; returns the number of failures (each reported as one line on stderr)."""
    files = collect_inputs(inputs)
    if not files:
        print("error: no input images found", file=sys.stderr)
        return 1
    if background is not None and background.kind not in ("color", "image", "blur", "transparent"):
        raise ValueError(f"background {background.kind!r} is not available for still images")
    out_path = Path(out)
    single = len(files) == 1 and not Path(inputs[0]).is_dir()
    suffix = ".png" if background is None or mask else ".jpg"
    # The same engine as for video (one frame per image, no smoothing): one compositing path for everything.
    options = StreamOptions(background=background or parse_background("transparent"), smoothing=0.0,
                            image=not mask, alpha=mask)
    failures = 0
    with Engine(backend, max_batch=1) as engine:
        stream = engine.open_stream(live=False, options=options)
        for src in files:
            try:
                with Image.open(src) as im:
                    rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                print(f"error: {src}: cannot read image ({exc.__class__.__name__}: {exc})", file=sys.stderr)
                failures += 1
                continue
            stream.submit(rgb)
            r = stream.get()
            if mask:
                result = Image.fromarray(r.alpha, "L")
            else:
                result = Image.fromarray(r.image, "RGBA" if r.format == "rgba" else "RGB")
            dest = output_path(src, out_path, single, suffix)
            if result.mode == "RGBA" and dest.suffix.lower() in {".jpg", ".jpeg"}:
                dest = dest.with_suffix(".png")
            save_atomic(result, dest)
            print(f"{src} -> {dest}")
    return failures
