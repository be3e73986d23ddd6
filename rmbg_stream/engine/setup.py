"""Model and device choice, shared by every front end: command-line options -> a ready `Backend`.

Front ends (`image`, `transcode`, `camera`, `server`) call `build_backend(args)` with their parsed options;
`cli` only parses and dispatches. Nothing here imports torch until a backend is built, so checking options
(`parse_resolution`, `check_background`) stays fast: inputs are checked before the model loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .backends import Backend


def parse_resolution(value: str | int | None) -> tuple[int, int] | None:
    """`--resolution` ("1024", 1024 or "1024x576", W x H) -> (h, w), or None; ValueError in one line."""
    if value is None:
        return None
    text = str(value).strip().lower()
    try:
        w, h = (int(v) for v in text.split("x")) if "x" in text else (int(text),) * 2
    except ValueError:
        raise ValueError(f"--resolution must be N or WxH (e.g. 1024 or 1024x576), got {value!r}") from None
    if w <= 0 or h <= 0 or w % 32 or h % 32:
        raise ValueError(f"--resolution sides must be positive multiples of 32, got {w}x{h}")
    return h, w


# The options of `cli.add_model_args`: what a backend is built from (a cluster worker gets each of them).
MODEL_OPTIONS = ("model", "device", "precision", "resolution", "patch_order", "runtime", "input_range", "model_output")


def load_backend(model: str, device: str = "auto", precision: str = "auto", resolution: str | int | None = None,
                 patch_order: str | None = None, runtime: str = "eager", input_range: str | None = None,
                 model_output: str | None = None) -> Backend:
    """The backend for `--model`, `--device`, `--precision`, `--resolution`, `--patch-order`, `--runtime`,
    `--input-range` and `--model-output` (see `cli`; runtimes in engine/runtimes.py). Callers other than the
    command line get eager by default."""
    from ..device import pick_device
    from .backends import create_backend

    res = parse_resolution(resolution)
    io = network_io(input_range, model_output)
    return create_backend(model, pick_device(device), precision, res, patch_order=patch_order, runtime=runtime,
                          io=io)


def network_io(input_range: str | None, model_output: str | None):
    """`--input-range` and `--model-output` -> a `NetworkIO`, or None when neither is given; both or neither."""
    if input_range is None and model_output is None:
        return None
    if input_range is None or model_output is None:
        raise ValueError("--input-range and --model-output go together: a graph needs both said")
    from ..models.contract import NetworkIO

    return NetworkIO(input_range, model_output)


def build_backend(args) -> Backend:
    """`load_backend` from parsed options (an `argparse.Namespace` of `cli.add_model_args`)."""
    # Scripts (bench_transcode) and tests build their own Namespace without the newer options.
    defaults = {"patch_order": None, "runtime": "eager", "input_range": None, "model_output": None}
    return load_backend(**{k: getattr(args, k, defaults.get(k)) for k in MODEL_OPTIONS})


def check_background(text: str | None) -> None:
    """An IMAGE background is opened and decoded now, before the model loads or any output opens: a missing,
    damaged or oversized picture (a decompression bomb) is one line here, not a traceback or a failure per frame."""
    from ..media.images import load_rgb
    from .background import parse_background

    background = parse_background(text) if text else None
    if background is not None and background.kind == "image":
        load_rgb(background.path, label=f"background image {background.path}")
