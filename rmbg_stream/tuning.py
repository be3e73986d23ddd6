"""Process tuning, in one place: thread counts, GIL switch interval, OpenMP wait policy, matmul precision, malloc.

Each setting says why, with the number it was measured at. `OMP_WAIT_POLICY` is set when the package is imported
(it must precede torch's OpenMP runtime); the rest is called by the front end that wants it: `tune_server`
(`serve`), `share_cpu` (`transcode`), `fast_matmul` and `fast_convolutions` (every network backend).
"""

from __future__ import annotations

import gc
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .engine.backends import Backend

_CORES: int | None = None  # this process's share of the machine (`limit_cores`); None: all of it


def cores() -> int:
    """CPU cores this process may use: its share (a cluster worker's) or the machine's."""
    return _CORES or os.cpu_count() or 1


def limit_cores(n: int | None) -> None:
    """This process owns `n` of the machine's cores (None: all): the engine's, decoders' and encoders' thread
    counts follow the share, not the node. A cluster worker of 4 CPUs on a 64-core node would otherwise start 32
    decoder and 32 encoder threads, and 16 such workers a thousand threads on 64 cores."""
    global _CORES
    _CORES = None if n is None else max(1, int(n))


def passive_openmp() -> None:
    """OpenMP threads that spin while waiting make every small torch op 10-50x slower as soon as another process
    (a browser, an encoder, a second session) holds a core; sleeping waiters cost almost nothing. It has to be set
    before torch loads its OpenMP runtime."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def fast_matmul() -> None:
    """TF32 matmuls on Ampere and later GPUs (torch's "high" precision)."""
    import torch

    torch.set_float32_matmul_precision("high")


def fast_convolutions(device: torch.device) -> None:
    """On CUDA, cuDNN times its convolution algorithms once per input shape and keeps the fastest
    (``cudnn.benchmark``). That first call of each shape is slow, so the engine warms every batch size up before
    any stream's frames (`engine.warm_up`). Nothing on the CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True


def tune_server(device: torch.device) -> None:
    """Process-wide settings for serving; measured on two cores with a browser beside the server."""
    # aiortc allocates a few objects per packet, so the cyclic GC runs often, and each full pass walked the ~200k
    # objects of torch and the model: a third of the server's CPU. Those are here for good; the GC can skip them.
    gc.collect()
    gc.freeze()
    from .server import memory

    memory.tune()  # before the engine's and the executor's threads start: see memory.py
    # The engine thread needs the GIL between its many small torch ops while the event loop runs aiortc's
    # pure-Python RTP path; at the default 5 ms switch interval the engine spends much of each batch waiting.
    # 0.1 ms: 4 sessions at 640x480 went from 18 to 23 fps each on two cores against 0.5 ms.
    sys.setswitchinterval(0.0001)
    if device.type == "cpu":
        import torch

        # The codecs and the event loop need cores too: an engine spread over all of them stalls on the busy ones
        # (on two cores, two threads were three times slower than one).
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def share_cpu(backend: Backend) -> None:
    """Tune the process for the engine thread and the decode / encode threads beside it.

    The engine thread takes the GIL back after every torch op; at the default 5 ms switch interval it waits on
    the decode, feed and encode threads' Python code each time. On the CPU, a backend without a network (the
    chroma keyer) runs its small ops no faster on two threads than on one (46 fps either way at 720p), while the
    decoder and encoder need a core of their own: leave them one."""
    import torch

    sys.setswitchinterval(0.0005)
    if backend.device.type == "cpu" and backend.resolution is None:
        torch.set_num_threads(max(1, cores() - 1))
