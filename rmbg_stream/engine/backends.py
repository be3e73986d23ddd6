"""Matting backends: a batch of RGB frames at the backend's resolution in, alpha out.

Contract (``Backend``): ``backend(x)`` takes float (B,3,h,w) in 0..1 on ``backend.device`` and returns
float32 (B,1,h,w) in 0..1. ``input_size(H, W)`` is the (h, w) an H x W frame must be resized to, or None
when the backend works at any size (chroma key); ``resolution`` is the nominal (h, w), or None likewise.
A fixed-size model maps every frame to ``resolution``; a dynamic one (``BiRefNet_dynamic``) keeps the
frame's aspect, at ``resolution``'s long side rounded to multiples of 32 (1920x1080 -> 1024x576).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch

from ..device import pick_dtype
from ..models import BiRefNet
from ..models.blocks import check_deform_stream
from ..models.contract import BIREFNET_IO, IMAGENET_MEAN, IMAGENET_STD, NetworkIO, normalise
from ..tuning import fast_convolutions, fast_matmul
from .background import parse_background
from .preprocess import check_size, fit_aspect
from .runtimes import CompiledNet, OnnxBackend, cached_export, choose_runtime, is_onnx, is_selfie

log = logging.getLogger(__name__)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Backend", "ChromaBackend", "NetworkBackend", "create_backend"]


class Backend(Protocol):
    """What the engine needs of a backend (see the module docstring). Optional capabilities are declared
    attributes, never probed for."""

    name: str
    device: torch.device
    dtype: torch.dtype
    resolution: tuple[int, int] | None
    # The alpha has edges finer than the network input that a guided filter recovers from the frame (a network);
    # False: plain bilinear upsampling (the chroma keyer, whose alpha on 4:2:0 streams comes from the chroma planes).
    guided: bool

    def input_size(self, h: int, w: int) -> tuple[int, int] | None: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class NetworkBackend:
    """A network that returns a list of maps, the final one last (BiRefNet, `SelfieNet`). `resolution` (h, w),
    multiples of 32 (16 for the selfie network); `aspect`: the model takes any such size (see the module
    docstring); `io`: how it takes RGB and what its last map is (`models.contract`)."""

    def __init__(self, model: torch.nn.Module, resolution: tuple[int, int], device: torch.device,
                 dtype: torch.dtype, name: str = "birefnet", aspect: bool = False, runtime: str = "eager",
                 io: NetworkIO = BIREFNET_IO, multiple: int = 32):
        check_size(resolution, multiple)
        check_deform_stream(device)
        fast_matmul()
        fast_convolutions(device)
        self.name = name
        self.resolution = tuple(resolution)
        self.aspect = aspect
        self.guided = True
        self.device = device
        self.dtype = dtype
        self.io = io
        self.model = model.eval().to(device=device, dtype=dtype)
        self.runtime = runtime  # "eager" or "compile" (engine/runtimes.py)
        self.net = CompiledNet(self.model, device) if runtime == "compile" else self.model
        self.scaling = io.scaling(device)

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        return fit_aspect(h, w, max(self.resolution)) if self.aspect else self.resolution

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.io.alpha(self.net(normalise(x, self.scaling).to(self.dtype))[-1])


class ChromaBackend:
    """Green/blue-screen keying by distance in the CbCr plane: no network, deterministic.

    It keys RGB, 4:2:0 streams too (the engine converts their planes at the chroma planes' size, clamped): a
    camera's chroma can lie outside the RGB gamut, and then its raw Cb/Cr are far from the colour it shows.
    Chromium's fake camera sends Y=17, U=V=6 (limited range): (0,147,0) on screen, a Cb/Cr 0.1 from the default
    key's, but raw planes 0.5 away, so keying the planes directly left it unkeyed. The conversion costs about
    0.8 ms a 640x480 frame on one CPU thread.

    ``key=None`` learns the key (``chroma:auto``): the median Cb/Cr of the frame borders over the first
    `learn_frames` frames the backend sees, then fixed. One backend serves every stream of an engine, so in a
    server the first frames of the first sessions decide.
    """

    BORDER = 0.04  # of the height: the width of the strips the auto key is learned from

    def __init__(self, device: torch.device, key=(0, 177, 64), tolerance: float = 0.12, softness: float = 0.08,
                 learn_frames: int = 15):
        self.auto = key is None
        self.name = "chroma:auto" if self.auto else "chroma"
        self.resolution = None
        self.guided = False  # see Backend
        self.device = device
        self.dtype = torch.float32
        self.key = None if self.auto else tuple(key)  # RGB 0..255; auto: the border colour learned so far
        # The key's (Cb, Cr), a (2,) float32 device tensor: fixed here, or learned from the first frames.
        self.key_cbcr = None if self.auto else torch.tensor(cbcr(*(c / 255 for c in key)), device=device)
        self.tolerance = tolerance
        self.softness = softness
        self.learn_frames = learn_frames
        self._seen: list[torch.Tensor] = []  # auto: each frame's border medians (Cb, Cr, R, G, B)

    def input_size(self, h: int, w: int) -> None:
        return None

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (B,3,h,w) RGB 0..1 -> alpha float32 (B,1,h,w) 0..1."""
        if self.auto and len(self._seen) < self.learn_frames:
            self._learn(x)
        # Element-wise, not a 1x1 convolution: on CUDA a float32 convolution may run in TF32, which moved the alpha
        # by up to 3 LSB (yuv.py's conversions are element-wise for the same reason).
        cb, cr = cbcr(x[:, 0:1], x[:, 1:2], x[:, 2:3])
        cb, cr = cb.sub_(self.key_cbcr[0]), cr.sub_(self.key_cbcr[1])
        dist = cb.square_().add_(cr.square_()).sqrt_()
        return dist.sub_(self.tolerance).div_(self.softness).clamp_(0, 1)

    def _learn(self, x: torch.Tensor) -> None:
        """Adds the border medians of the frames of `x` and keys the median over all frames seen so far."""
        for frame in x[: self.learn_frames - len(self._seen)]:
            self._seen.append(border_median(frame, self.BORDER))
        m = torch.stack(self._seen).median(0).values
        self.key_cbcr = m[:2]
        self.key = tuple(round(float(v) * 255) for v in m[2:])
        if len(self._seen) == self.learn_frames:
            log.info("chroma:auto: key #%02x%02x%02x, learned from the borders of %d frames", *self.key,
                     self.learn_frames)


CBCR = ((-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))  # RGB -> Cb, Cr (BT.601, full range, centred)


def cbcr(r, g, b) -> tuple:
    """(Cb, Cr) of R, G, B 0..1 (tensors of one shape, or floats), centred on 0: element-wise, in the input's
    precision."""
    (a0, a1, a2), (b0, b1, b2) = CBCR
    return r * a0 + g * a1 + b * a2, r * b0 + g * b1 + b * b2


def border_median(frame: torch.Tensor, border: float) -> torch.Tensor:
    """(Cb, Cr, R, G, B) medians over the outer strips of a (3,h,w) RGB 0..1 frame, `border` of its height wide
    (at least a pixel). Medians ignore a subject that reaches an edge while it covers less than half of the
    strips."""
    k = max(1, round(border * frame.shape[-2]))
    strips = [frame[:, :k], frame[:, -k:], frame[:, k:-k, :k], frame[:, k:-k, -k:]]
    px = torch.cat([s.reshape(3, -1) for s in strips], 1)
    return torch.cat([torch.stack(cbcr(*px)), px]).median(1).values


def create_backend(name: str, device: torch.device, precision: str = "auto",
                   resolution: tuple[int, int] | None = None, *, patch_order: str | None = None,
                   runtime: str = "eager", io: NetworkIO | None = None) -> Backend:
    """`name`: ``chroma``, ``chroma:<colour>`` or ``chroma:auto``; ``selfie`` or ``selfie-landscape`` (MediaPipe's
    selfie segmenter, bundled), or a ``.tflite`` file of it; ``random:<backbone>`` (untrained, for benchmarks and
    tests); a ``.onnx`` graph (`rmbg-stream export`); otherwise a BiRefNet checkpoint: hub id, alias, snapshot folder
    or weights file. `resolution` (h, w) overrides the model's own; a dynamic model given a square one keeps each
    frame's aspect at that long side, a non-square one is taken as is. `runtime`: see engine/runtimes.py. `io`:
    what a .onnx graph without our metadata takes and gives (`--input-range`, `--model-output`); refused for
    other models, whose files say it themselves."""
    if resolution is not None:
        check_size(resolution)
    runtime = choose_runtime(runtime, name, device)
    if io is not None and not is_onnx(name):
        raise ValueError(f"--input-range and --model-output describe a .onnx graph; {name} says them itself")
    if name == "chroma" or name.startswith("chroma:"):
        return create_chroma(name, device)
    if is_selfie(name) and resolution is not None:
        raise ValueError(f"{name} runs at the size it was trained at (its file fixes it): leave out --resolution")
    if runtime == "onnx":
        return create_onnx(name, device, precision, resolution, patch_order, io)
    dtype = pick_dtype(precision, device)
    if is_selfie(name):
        from ..models.selfie import load_selfie

        model, info = load_selfie(name)
        return NetworkBackend(model, info.resolution, device, dtype, name, runtime=runtime, io=info.io, multiple=16)
    if name.startswith("random:"):
        backbone = name.split(":", 1)[1]
        log.warning("random weights for %s: output masks are meaningless (benchmarks and tests only)", backbone)
        return NetworkBackend(BiRefNet(backbone), resolution or (1024, 1024), device, dtype, name, runtime=runtime)
    from ..models.weights import load_birefnet

    model, info = load_birefnet(name, patch_order=patch_order)
    dynamic = info.spec is not None and info.spec.dynamic
    aspect = dynamic and (resolution is None or resolution[0] == resolution[1])
    return NetworkBackend(model, resolution or info.resolution, device, dtype, name, aspect, runtime)


def load_network(name: str, resolution: tuple[int, int] | None = None, patch_order: str | None = None
                 ) -> NetworkBackend:
    """The network alone, float32 on the CPU, eager: what an export starts from (`export`, the ONNX cache)."""
    backend = create_backend(name, torch.device("cpu"), "fp32", resolution, patch_order=patch_order, runtime="eager")
    if not isinstance(backend, NetworkBackend):  # create_backend gives a network for every name but chroma
        raise ValueError(f"{name} has no network to export")
    return backend


def network_meta(backend: NetworkBackend, source: str) -> dict[str, str]:
    """What an exported graph records of its network (``rmbg_stream.*`` metadata; `OnnxBackend` reads it)."""
    meta = {"source": source, "input_range": backend.io.input_range, "output": backend.io.output}
    if isinstance(backend.model, BiRefNet):
        return meta | {"network": "birefnet", "backbone": backend.model.backbone}
    return meta | {"network": "selfie"}


def create_chroma(name: str, device: torch.device) -> ChromaBackend:
    if ":" not in name:
        return ChromaBackend(device)
    if name == "chroma:auto":
        return ChromaBackend(device, key=None)
    key = parse_background(name.split(":", 1)[1])
    if key.kind != "color":
        raise ValueError(f"chroma key must be a colour (#rrggbb or a name), got {name!r}")
    return ChromaBackend(device, key.color)


def create_onnx(name: str, device: torch.device, precision: str, resolution: tuple[int, int] | None,
                patch_order: str | None, io: NetworkIO | None = None) -> OnnxBackend:
    """An `OnnxBackend` for a .onnx file, or for a checkpoint exported first (engine/runtimes.py)."""
    if precision not in ("auto", "fp32"):
        raise ValueError(f"--runtime onnx runs the fp32 graph; --precision {precision} needs --runtime eager "
                         "or compile")
    if name.lower().endswith(".onnx"):
        if not Path(name).is_file():
            raise FileNotFoundError(f"ONNX graph {name} not found")
        if resolution is not None:
            raise ValueError(f"{name} has its input size fixed at export: leave out --resolution")
        return OnnxBackend(name, device, io=io)
    path = cached_export(name, resolution, patch_order)
    try:
        return OnnxBackend(path, device, name)
    finally:
        if name.startswith("random:"):
            path.unlink(missing_ok=True)  # the session holds the graph in memory; random weights are never reused
