"""The conformance vectors of ../shared/conformance and their deterministic synthetic weights (see its README).

tests/data/ ships a compact copy with the repository, so a fresh clone tests the network too: per vector the
input, the final and side outputs (out0..out3), every integer buffer, a subsample of the encoder features
(`enc1_sub`.. `enc4_sub`, taken with ENC_SUB), and the reference's key tables. The full files add the full
encoder features; they are looked for in $RMBG_CONFORMANCE, else ../shared/conformance beside the checkout,
and the tests that need them skip when they are absent. Rebuild tests/data from the full files with
`python -m tests.conformance`.
"""

from __future__ import annotations

import math
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"
CONFORMANCE = Path(os.environ.get("RMBG_CONFORMANCE", Path(__file__).resolve().parents[2] / "shared" / "conformance"))
# Every 16th channel and every 4th row and column: 12 to 360 channels, 2x2 to 16x16, ~250 kB in all.
ENC_SUB = (slice(None), slice(None, None, 16), slice(None, None, 4), slice(None, None, 4))
OUTS = ("out0", "out1", "out2", "out3")
ENCS = ("enc1", "enc2", "enc3", "enc4")


@dataclass(frozen=True)
class Vector:
    family: int
    backbone: str
    patch_order: str


VECTORS = {
    "lite_256": Vector(1, "swin_v1_t", "legacy"),
    "general_256": Vector(2, "swin_v1_l", "legacy"),
    "current_t_256": Vector(21, "swin_v1_t", "current"),
}
FAMILY = {name: v.family for name, v in VECTORS.items()}
BACKBONE = {name: v.backbone for name, v in VECTORS.items()}


def full_vectors() -> Path | None:
    """The folder of the full files, or None when it is absent (a fresh clone)."""
    return CONFORMANCE if (CONFORMANCE / "lite_256.npz").is_file() else None


def read_keys(backbone: str) -> list[tuple[str, list[int], str]]:
    rows = []
    for line in (DATA / f"keys_{backbone}.tsv").read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, [int(s) for s in shape.strip("[]").split(",") if s.strip()], dtype))
    return rows


def synthetic_tensor(key: str, shape: list[int], family: int) -> torch.Tensor:
    rng = np.random.default_rng(zlib.crc32(key.encode("utf-8")) ^ family)
    last = key.rsplit(".", 1)[-1]
    if last == "running_var":
        # Drawn from the fresh generator: no normal draw comes first (checked against the vectors).
        return torch.from_numpy(rng.uniform(0.5, 2.0, shape).astype(np.float32))
    n = rng.standard_normal(shape)
    if last == "running_mean" or last == "relative_position_bias_table":
        v = n * 0.1
    elif len(shape) == 4:
        v = n * math.sqrt(2 / math.prod(shape[1:]))
    elif len(shape) == 2:
        v = n / math.sqrt(shape[1])
    elif last == "weight":
        v = 1 + 0.1 * n
    elif last == "bias":
        v = 0.05 * n
    else:
        raise AssertionError(f"no rule for {key}")
    return torch.from_numpy(np.asarray(v, dtype=np.float32))


def compact_vectors(name: str) -> dict[str, np.ndarray]:
    """tests/data/<name>.npz: input, out0..out3, enc*_sub and buffer/<key> (see the module docstring)."""
    with np.load(DATA / f"{name}.npz") as z:
        return dict(z)


def synthetic_state_dict(name: str) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """The reference-named state dict for vector `name`, in that vector's patch order, and its compact arrays."""
    arrays = compact_vectors(name)
    sd = {}
    for key, shape, dtype in read_keys(BACKBONE[name]):
        if dtype.startswith("float"):
            sd[key] = synthetic_tensor(key, shape, FAMILY[name])
        else:
            sd[key] = torch.from_numpy(arrays[f"buffer/{key}"]).reshape(shape)
    return sd, arrays


def compact(full: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of tests/data from those of a full vector file: encoder features subsampled, the rest kept."""
    out = {k: v for k, v in full.items() if k not in ENCS}
    out.update({f"{k}_sub": np.ascontiguousarray(full[k][ENC_SUB]) for k in ENCS})
    return out


def main() -> int:
    """Write tests/data from the full files."""
    source = full_vectors()
    if source is None:
        print(f"error: no conformance vectors in {CONFORMANCE}; set RMBG_CONFORMANCE", file=sys.stderr)
        return 2
    DATA.mkdir(exist_ok=True)
    for name in VECTORS:
        with np.load(source / f"{name}.npz") as z:
            np.savez_compressed(DATA / f"{name}.npz", **compact(dict(z)))
    for backbone in sorted({v.backbone for v in VECTORS.values()}):
        (DATA / f"keys_{backbone}.tsv").write_bytes((source / f"keys_{backbone}.tsv").read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
