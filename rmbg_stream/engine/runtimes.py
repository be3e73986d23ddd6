"""How the network runs: `--runtime eager|compile|onnx|auto`, behind the one `Backend` contract.

- ``eager``: PyTorch module calls (`NetworkBackend` alone).
- ``compile``: `CompiledNet`, ``torch.compile`` with shapes fixed per (h, w, batch). Batches are padded up to
  the next power of two (1, 2, 4, 8 ...) and the result sliced back, so an engine whose batches vary compiles
  at most log2(max batch) + 1 graphs per input size; the engine never sees the padding. Compiled kernels stay
  in inductor's on-disk cache (``$TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_$USER``), so a
  second start skips code generation. On CUDA the graphs are replayed as CUDA graphs (``reduce-overhead``).
- ``onnx``: `OnnxBackend`, an exported graph (`rmbg_stream.export`) run by onnxruntime: the CPU provider,
  or TensorRT / CUDA when onnxruntime-gpu is installed (the ``[gpu]`` extra) and the device is CUDA. A
  checkpoint given with ``--runtime onnx`` is exported once into ``$RMBG_ONNX_CACHE``, default
  ``$XDG_CACHE_HOME/rmbg-stream/onnx`` (``~/.cache/rmbg-stream/onnx``).
- ``auto``: the row of `AUTO` for the device (see README, "Runtimes", for the measurements behind it);
  a ``.onnx`` model always runs on ``onnx``. Random weights (``random:<backbone>``, tests and benchmarks) stay
  eager under ``auto``: they differ at every start, so an export or a compilation would be paid every time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..models.contract import BIREFNET_IO, NetworkIO, normalise

log = logging.getLogger(__name__)

RUNTIMES = ("eager", "compile", "onnx", "auto")
# auto's choice per device type. CPU: measured (README "Runtimes"; scripts/bench_model.py --compare).
# CUDA: unmeasured (no GPU lent yet): compile, because CUDA graphs remove the per-kernel launch cost that
# dominates Swin's many small kernels at batch 1-4, and it needs no export step or extra package.
AUTO = {"cpu": "onnx", "cuda": "compile"}
# onnxruntime providers per device type, best first; those not installed are skipped.
PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


def is_onnx(model: str) -> bool:
    return model.lower().endswith(".onnx")


def is_selfie(model: str) -> bool:
    """MediaPipe's selfie segmenter: a bundled name or a .tflite file of it (models/selfie.py)."""
    from ..models.selfie import lookup_selfie

    return lookup_selfie(model) is not None or model.lower().endswith(".tflite")


def choose_runtime(runtime: str, model: str, device: torch.device) -> str:
    """The concrete runtime for `--runtime` (validated here, in one line) and a model name."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if model == "chroma" or model.startswith("chroma:"):
        return "eager"  # no network: nothing to compile or export
    if is_onnx(model):
        if runtime in ("eager", "compile"):
            raise ValueError(f"{model} is an ONNX graph: it runs with --runtime onnx (or auto), not {runtime}")
        return "onnx"
    if runtime == "auto":
        if model.startswith("random:"):
            return "eager"  # see the module docstring
        runtime = AUTO.get(device.type, "eager")
        if runtime == "onnx" and not onnx_available():
            return "eager"
    return runtime


def onnx_available() -> bool:
    """onnxruntime and the exporter's packages (the ``onnx`` extra) are installed; found without importing them."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def bucket(n: int) -> int:
    """The compiled batch size a batch of `n` is padded up to: the next power of two."""
    return 1 << (n - 1).bit_length()


def pad_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    """(b,...) -> (n,...), n >= b, by repeating the last item (real data: no NaN paths in padding)."""
    b = x.shape[0]
    return x if n == b else torch.cat([x, x[-1:].expand(n - b, *x.shape[1:])])


def inductor_cache() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


class CompiledNet:
    """`torch.compile` of a network returning a list of maps (B,1,h',w'); see the module docstring."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        # Each (batch, h, w) is its own graph; the default limit of 8 would fall back to eager after 8 sizes.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # CPU: freezing folds the weights into the graph as constants and lets inductor pre-pack them for oneDNN;
        # measured 1.31x eager against 1.04x without it (Swin-T 256 batch 2, README "Runtimes"). The weights
        # never change after loading, which is what freezing assumes.
        if self.cuda:
            self.fn = torch.compile(model, dynamic=False, mode="reduce-overhead")
        else:
            self.fn = torch.compile(model, dynamic=False, options={"freezing": True})
        self.seen: set[tuple[int, ...]] = set()

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = x.shape[0]
        n = bucket(b)
        key = (n, *x.shape[2:])
        fresh = key not in self.seen
        if fresh:
            print(f"compiling the network for {x.shape[3]}x{x.shape[2]}, batch {n} (once per size; "
                  f"kernels cached in {inductor_cache()}) ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.fn(pad_batch(x, n))
        # CUDA graphs reuse their output buffers at the next replay: copy what the caller keeps.
        out = [o[:b].clone() if self.cuda else o[:b] for o in out]
        if fresh:
            self.seen.add(key)
            print(f"compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        return out


class OnnxBackend:
    """An exported BiRefNet graph under onnxruntime; the `Backend` contract (engine/backends.py).

    x float (B,3,h,w) 0..1 -> alpha float32 (B,1,h,w) 0..1, h x w = `resolution`, fixed by the graph. A graph
    of fixed batch N runs batches in chunks of N, the last padded; a dynamic one runs each batch whole.
    """

    def __init__(self, path: str | os.PathLike, device: torch.device, name: str | None = None,
                 io: NetworkIO | None = None):
        import onnxruntime as ort

        providers = [p for p in PROVIDERS.get(device.type, ()) if p in ort.get_available_providers()]
        if not providers or providers == ["CPUExecutionProvider"] and device.type != "cpu":
            raise ValueError(f"onnxruntime has no provider for {device.type} here: install onnxruntime-gpu "
                             "(pip install 'rmbg-stream[gpu]') or use --device cpu")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(os.fspath(path), options, providers=providers)
        shape = self.session.get_inputs()[0].shape  # [B or 'batch', 3, h, w]
        if len(shape) != 4 or shape[1] != 3 or not all(isinstance(d, int) for d in shape[2:]):
            raise ValueError(f"{path} takes an input of shape {shape}: expected (B,3,h,w) RGB, h and w fixed")
        self.batch = shape[0] if isinstance(shape[0], int) else None
        self.name = name or os.fspath(path)
        self.resolution = (int(shape[2]), int(shape[3]))
        self.guided = True
        self.device = device
        self.dtype = torch.float32
        self.io = io or graph_io(self.session.get_modelmeta().custom_metadata_map, path)
        self.scaling = self.io.scaling(device)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[-1].name  # the final mask (BiRefNet's out3)

    def input_size(self, h: int, w: int) -> tuple[int, int]:
        return self.resolution

    def final_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float32 (B,3,h,w) on `device` -> the graph's last output (B,1,h,w) (logits or alpha, by
        `io`), on `device` too.

        Inputs and output are bound to torch's own memory (`io_binding`), so a CUDA batch never goes through the
        host: the old `x.cpu().numpy()` path copied each batch down and the mask back up, with a sync each way.
        """
        b = x.shape[0]
        step = self.batch or b
        out = torch.empty((b, 1, *self.resolution), dtype=torch.float32, device=x.device)
        kind, index = x.device.type, x.device.index or 0
        if kind == "cuda":
            # onnxruntime runs on its own CUDA stream: what torch queued on ours must be done first.
            torch.cuda.current_stream(x.device).synchronize()
        for i in range(0, b, step):
            n = min(step, b - i)
            chunk = x[i : i + step]
            if self.batch is not None and n < self.batch:
                chunk = pad_batch(chunk, self.batch)
            chunk = chunk.contiguous()
            padded = len(chunk) > n
            dest = torch.empty((len(chunk), *out.shape[1:]), device=x.device) if padded else out[i : i + n]
            binding = self.session.io_binding()
            binding.bind_input(self.input_name, kind, index, np.float32, tuple(chunk.shape), chunk.data_ptr())
            binding.bind_output(self.output_name, kind, index, np.float32, tuple(dest.shape), dest.data_ptr())
            self.session.run_with_iobinding(binding)  # returns when the outputs are written, on every provider
            if padded:
                out[i : i + n] = dest[:n]
        return out

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.io.alpha(self.final_logits(normalise(x.to(self.device, torch.float32), self.scaling)))


def graph_io(meta: dict[str, str], path) -> NetworkIO:
    """What a graph takes and gives, from its ``rmbg_stream.*`` metadata (`export.py`). Graphs exported before that
    metadata existed name a BiRefNet ``backbone`` (the only network we exported then): ImageNet input, logits out.
    Any other graph is refused: its input range and output cannot be told, and a guess gives wrong masks."""
    if "rmbg_stream.input_range" in meta and "rmbg_stream.output" in meta:
        return NetworkIO(meta["rmbg_stream.input_range"], meta["rmbg_stream.output"])
    if "rmbg_stream.backbone" in meta:
        return BIREFNET_IO
    raise ValueError(f"{path} does not say what input range it takes or whether its output is logits or an alpha: "
                     "pass --input-range 0..1|0..255|-1..1|imagenet and --model-output logits|probability")


def cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def cached_export(model: str, resolution: tuple[int, int] | None, patch_order: str | None) -> Path:
    """The ONNX graph of checkpoint `model`, exported once into the cache (see the module docstring); random
    weights (``random:<backbone>``) differ at every start, so they are exported to a fresh file each time."""
    from ..export import check_exporter, export_network
    from .backends import load_network, network_meta

    check_exporter()
    root = Path(os.environ.get("RMBG_ONNX_CACHE") or cache_home() / "rmbg-stream" / "onnx")
    if model.startswith("random:"):
        path = root / f"random-{os.getpid()}-{time.monotonic_ns()}.onnx"
    else:
        weights = weights_file(model)
        stat = weights.stat()
        key = f"{weights.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{resolution}|{patch_order}|{torch.__version__}"
        path = root / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.onnx"
        if path.is_file():
            return path
    # Loaded first: a bad checkpoint is its own one-line error, with no export notice before it.
    net = load_network(model, resolution, patch_order)
    root.mkdir(parents=True, exist_ok=True)
    where = "random weights: not kept" if model.startswith("random:") else f"once; cached as {path}"
    print(f"exporting {model} to ONNX ({where}) ...", file=sys.stderr, flush=True)
    result = export_network(net.model, path, net.resolution, None, network_meta(net, model))
    print(f"exported in {result.seconds:.1f} s", file=sys.stderr, flush=True)
    return path


def weights_file(model: str) -> Path:
    """The file a network's weights come from (the cache key of its export)."""
    if is_selfie(model):
        from ..models.selfie import lookup_selfie

        spec = lookup_selfie(model)
        return spec.path if spec else Path(model)
    from ..models.weights import resolve

    return resolve(model, None)[0]
