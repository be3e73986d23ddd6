"""Device and precision choice, shared by every front end.

Half precision on the CPU: bf16 is allowed where the CPU computes it natively (AVX512-BF16 or AMX-BF16 on
x86, the BF16 extension on Arm): Swin-T at 384x384 ran 1.2x faster than fp32 (5.7 s against 6.9 s,
alternating runs on a shared 2-core AMD EPYC with AVX512-BF16); without it bf16 is emulated and gains
nothing. fp16 stays refused on the CPU: without AVX512-FP16 PyTorch falls back to its reference
convolution, about 17x slower than fp32 (Swin-T at 256x256: 75 s against 4.3 s, single runs, same machine).
"""

from __future__ import annotations

from pathlib import Path

import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# CPU feature names (torch.cpu.get_capabilities(), /proc/cpuinfo flags) that mean bf16 arithmetic in hardware.
NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def cpu_features() -> set[str]:
    """Lower-case feature names of this CPU, from PyTorch's probe and, on Linux, /proc/cpuinfo."""
    found = set()
    probe = getattr(torch.cpu, "get_capabilities", None)  # public since torch 2.7; older ones lack it
    if probe is not None:
        found |= {k.lower() for k, v in probe().items() if v is True}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.split(":")[0].strip().lower() in ("flags", "features"):
                found |= set(line.split(":", 1)[1].lower().split())
    return found


def cpu_has_native_bf16() -> bool:
    return any(f in cpu_features() for f in NATIVE_BF16)


# Which precisions each device type runs; the CPU's bf16 further needs native_bf16().
ALLOWED = {"cuda": ("fp32", "fp16", "bf16"), "cpu": ("fp32", "bf16")}


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        # fp16 costs no measurable quality on BiRefNet and halves the work on CUDA.
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, fp16 or bf16")
    allowed = ALLOWED.get(device.type, ("fp32",))
    if precision not in allowed:
        raise ValueError(f"--precision {precision} needs CUDA; on {device.type} use {' or '.join(allowed)}")
    if device.type == "cpu" and precision == "bf16" and not cpu_has_native_bf16():
        raise ValueError("--precision bf16 on the CPU needs native bf16 (AVX512-BF16, AMX-BF16 or Arm BF16), "
                         "which this CPU lacks; use fp32")
    return PRECISIONS[precision]
