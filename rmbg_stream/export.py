"""`rmbg-stream export`: a BiRefNet checkpoint or the selfie segmenter -> an ONNX graph that `--model FILE.onnx`
runs through onnxruntime.

A BiRefNet graph takes the normalised image, float32 (B,3,h,w) (ImageNet mean/std already applied: the backend
does that), and returns the four logit maps of `BiRefNet.forward`: ``out0`` (B,1,h/32,w/32), ``out1`` (1/16),
``out2`` (1/8) and ``out3`` (B,1,h,w); alpha = sigmoid(out3). The selfie graph takes RGB (B,3,h,w) in 0..1 and
returns ``alpha`` (B,1,h,w), already a probability. Spatial size is fixed; the batch is fixed (``--batch N``) or
a symbolic axis (``--batch dynamic``). What the input range is and whether the last output is logits is in the
metadata (``rmbg_stream.input_range``, ``rmbg_stream.output``): a graph that says neither is refused when run.

Deformable convolutions stay one native ONNX ``DeformConv`` node each (opset 19+): PyTorch's dynamo exporter
(``torch.onnx.export(dynamo=True)``, torch 2.14) translates ``torchvision::deform_conv2d`` to it, and
onnxruntime's CPU provider runs it (1.32: checked by tests/test_export.py). No gathers: an unrolled graph
takes gigabytes. The TorchScript exporter has no translation for that op and is not used.

The file is written beside the target and renamed into place: a failed export leaves nothing. The model's
resolution, batch and source are stored in the graph's metadata (``rmbg_stream.*``) for `OnnxBackend`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import BiRefNet

log = logging.getLogger(__name__)

OPSET = 19  # the first opset with DeformConv
OUTPUTS = ("out0", "out1", "out2", "out3")
MAX_DYNAMIC_BATCH = 64  # the upper bound the exporter is told for `--batch dynamic`


@dataclass(frozen=True)
class ExportResult:
    path: Path
    resolution: tuple[int, int]  # (h, w)
    batch: int | None  # None: dynamic
    seconds: float
    deform_nodes: int
    size_mb: float


def parse_batch(value: str | int) -> int | None:
    """`--batch` "N" or "dynamic" -> N (>= 1) or None; ValueError in one line."""
    if str(value).strip().lower() == "dynamic":
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"--batch must be a positive integer or 'dynamic', got {value!r}") from None
    if n < 1:
        raise ValueError(f"--batch must be a positive integer or 'dynamic', got {value!r}")
    return n


def check_output(path: Path) -> None:
    """The target must end in .onnx and its folder must exist and be writable: checked before the model loads."""
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"output {path} must end in .onnx")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"output folder {folder} does not exist")
    if path.is_dir():
        raise ValueError(f"output {path} is a folder")
    probe = path.with_name(f".{path.name}.{os.getpid()}.probe")  # os.access says yes to root on read-only mounts
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"cannot write to {folder}: {exc.strerror}") from None


def export_onnx(model: str, output: str | os.PathLike, resolution: str | int | None = None, batch: str | int = 1,
                patch_order: str | None = None) -> ExportResult:
    """Export `model` (as `--model` takes it, chroma aside) to `output`; see the module docstring."""
    from .engine.backends import load_network, network_meta
    from .engine.setup import parse_resolution

    path = Path(output)
    check_output(path)
    res = parse_resolution(resolution)
    n = parse_batch(batch)
    if model == "chroma" or model.startswith("chroma:"):
        raise ValueError("the chroma keyer has no network to export; pass a BiRefNet checkpoint or selfie")
    if model.lower().endswith(".onnx"):
        raise ValueError(f"{model} is already an ONNX graph; pass the checkpoint it came from")
    check_exporter()
    backend = load_network(model, res, patch_order)
    return export_network(backend.model, path, backend.resolution, n, network_meta(backend, model))


def export_network(network: torch.nn.Module, path: Path, resolution: tuple[int, int], batch: int | None,
                   meta: dict[str, str]) -> ExportResult:
    """Exports a float32 CPU `network` at (h, w) = `resolution` to `path` (checked by the caller), atomically."""
    h, w = resolution
    t0 = time.perf_counter()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        names = list(OUTPUTS) if isinstance(network, BiRefNet) else ["alpha"]
        program = trace(network, h, w, batch, names)
        write(program, tmp, {"resolution": f"{w}x{h}", "batch": "dynamic" if batch is None else str(batch), **meta})
        deform = count_ops(tmp, "DeformConv")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(path, (h, w), batch, time.perf_counter() - t0, deform, path.stat().st_size / 2**20)


def check_exporter() -> None:
    """The exporter needs onnx and onnxscript (the ``onnx`` extra): one line, before the model loads."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"export needs {exc.name}: pip install 'rmbg-stream[onnx]'") from None


def trace(network, h: int, w: int, batch: int | None, names: list[str]):
    """The dynamo exporter's ONNXProgram of `network` for (batch or a symbolic B, 3, h, w) float32 input."""
    x = torch.zeros(batch or 2, 3, h, w)
    dynamic = None if batch is not None else {"x": {0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)}}
    with torch.inference_mode(False), torch.no_grad():
        return torch.onnx.export(Network(network).eval(), (x,), dynamo=True, opset_version=OPSET,
                                 input_names=["x"], output_names=names, dynamic_shapes=dynamic,
                                 verbose=False)


class Network(torch.nn.Module):
    """`network` with its outputs as a tuple (the exporter names them `OUTPUTS`)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.net = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.net(x))


def write(program, path: Path, meta: dict[str, str]) -> None:
    """Saves `program` to `path` as one file (weights inside: < 2 GB for every backbone) with `meta`."""
    import onnx

    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"rmbg_stream.{key}", value
    onnx.save(proto, str(path))


def count_ops(path: Path, op: str) -> int:
    import onnx

    return sum(node.op_type == op for node in onnx.load(str(path), load_external_data=False).graph.node)
