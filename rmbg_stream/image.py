"""`rmbg-stream image`: cut out still images (files or folders) with one loaded model.

Everything is planned before anything is written (`plan`): each input gets its output path, and a plan that would
write over an input (under any spelling: symlink, `..`, hard link), write two results to one path, or treat a file
as a folder is refused in one line before the model loads. Inputs are then read through `media.images` (pixel
limit, 16-bit grey, EXIF orientation); an unreadable input is reported in one line and the others still run.
Outputs are written beside their target and renamed into place, with the permissions the umask gives.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .engine.composite import Background, parse_background
from .engine.engine import Engine, StreamOptions
from .media.images import ImageError, load_rgb, open_image
from .media.writer import temp_beside

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
JPEG_SUFFIXES = {".jpg", ".jpeg"}
STILL_BACKGROUNDS = ("color", "image", "blur", "transparent")


@dataclass(frozen=True)
class Job:
    """One input picture and the path its result is written to."""

    src: Path
    dest: Path


def collect_inputs(inputs: list[str]) -> list[Path]:
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        else:
            files.append(item)
    return files


def _check_folder(folder: Path, out: Path, why: str) -> None:
    """`folder` is, or can be created as, a folder: neither it nor any parent is an existing non-folder."""
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise ImageError(f"-o {out}: {p} is a file, not a folder{why}")
            return


def _check_not_inputs(jobs: list[Job]) -> None:
    """No output is an input (compared by device and inode, which sees through every spelling of a path)."""
    inputs = {}
    for job in jobs:
        try:
            st = os.stat(job.src)
        except OSError:
            continue  # unreadable inputs are reported one by one later
        inputs[(st.st_dev, st.st_ino)] = job.src
    for job in jobs:
        try:
            st = os.stat(job.dest)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in inputs:
            raise ImageError(f"-o {job.dest} would overwrite the input {inputs[st.st_dev, st.st_ino]}: "
                             "write the results somewhere else")


def _check_distinct(jobs: list[Job]) -> None:
    seen: dict[str, Path] = {}
    for job in jobs:
        key = os.path.normcase(os.path.abspath(job.dest))
        if key in seen and seen[key] == job.src:
            raise ImageError(f"{job.src} is given twice")
        if key in seen:
            raise ImageError(f"{seen[key]} and {job.src} would both be written to {job.dest}: "
                             "give each a folder of its own")
        seen[key] = job.src
        if job.dest.is_dir():
            raise ImageError(f"{job.dest} is a folder: it cannot be replaced by the result of {job.src}")


def plan(inputs: list[str], out: str | Path, *, mask: bool = False, background: Background | None = None) -> list[Job]:
    """Each input with its output path; ImageError (one line) for a plan that cannot be carried out safely.

    One file in and an image name out (`-o cut.png`) writes that file; otherwise `out` is a folder and each result
    is named after its input (the whole name where two inputs share a stem). Results with alpha are PNGs.
    """
    if background is not None and background.kind not in STILL_BACKGROUNDS:
        raise ImageError(f"background {background.kind!r} is not available for still images")
    files = collect_inputs(inputs)
    if not files:
        raise ImageError("no input images found")
    folder_named = str(out).endswith(("/", os.sep))  # `-o name.png/` asks for a folder, whatever the suffix
    out = Path(out)
    alpha = not mask and (background is None or background.kind == "transparent")
    folder_input = any(Path(i).is_dir() for i in inputs)
    if (len(files) == 1 and not folder_input and not folder_named and out.suffix.lower() in IMAGE_SUFFIXES
            and not out.is_dir()):
        _check_folder(out.parent, out, "")
        dests = [out]
    else:
        why = "a folder input" if folder_input else f"{len(files)} inputs" if len(files) > 1 else ""
        _check_folder(out, out, f" (a folder is needed for {why})" if why else
                      f" (name an image file: {' '.join(sorted(IMAGE_SUFFIXES))}; or a folder)")
        suffix = ".png" if mask or alpha else ".jpg"
        stems = [p.stem for p in files]
        dests = [out / ((p.stem if stems.count(p.stem) == 1 else p.name) + suffix) for p in files]
    if alpha:
        dests = [d.with_suffix(".png") if d.suffix.lower() in JPEG_SUFFIXES else d for d in dests]
    jobs = [Job(src, dest) for src, dest in zip(files, dests)]
    _check_distinct(jobs)
    _check_not_inputs(jobs)
    return jobs


def readable(jobs: list[Job]) -> tuple[list[Job], int]:
    """The jobs whose input opens and passes the pixel limit (header only), and how many failed (each reported)."""
    ok = []
    for job in jobs:
        try:
            open_image(job.src).close()
            ok.append(job)
        except ImageError as exc:
            print(f"error: {exc}", file=sys.stderr)
    return ok, len(jobs) - len(ok)


def save_atomic(image: Image.Image, dest: Path) -> None:
    """Write beside the target and rename, so a failure never leaves a half-written file. The file is created
    like any other (0666 less the umask), not private as mkstemp would make it."""
    tmp = temp_beside(dest, folder=False)
    try:
        image.save(tmp, format=Image.registered_extensions()[dest.suffix.lower()])
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def run(backend, jobs: list[Job], mask: bool = False, background: Background | None = None) -> int:
    """Process every planned job; returns the number of failures (each reported as one line on stderr)."""
    # The same engine as for video (one frame per image, no smoothing): one compositing path for everything.
    options = StreamOptions(background=background or parse_background("transparent"), smoothing=0.0,
                            image=not mask, alpha=mask)
    failures = 0
    with Engine(backend, max_batch=1) as engine:
        stream = engine.open_stream(live=False, options=options)
        for job in jobs:
            try:
                rgb = load_rgb(job.src)
            except ImageError as exc:
                print(f"error: {exc}", file=sys.stderr)
                failures += 1
                continue
            stream.submit(rgb)
            r = stream.get()
            if mask:
                result = Image.fromarray(r.alpha, "L")
            else:
                result = Image.fromarray(r.image, "RGBA" if r.format == "rgba" else "RGB")
            try:
                save_atomic(result, job.dest)
            except OSError as exc:
                print(f"error: {job.dest}: cannot write the result ({exc.strerror or exc})", file=sys.stderr)
                failures += 1
                continue
            print(f"{job.src} -> {job.dest}")
    return failures
