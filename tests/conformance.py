"""The deterministic synthetic weights of ../shared/conformance (see its README)."""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

CONFORMANCE = Path(os.environ.get("RMBG_CONFORMANCE", Path(__file__).resolve().parents[2] / "shared" / "conformance"))
FAMILY = {"lite_256": 1, "general_256": 2}
BACKBONE = {"lite_256": "swin_v1_t", "general_256": "swin_v1_l"}


def read_keys(backbone: str) -> list[tuple[str, list[int], str]]:
    rows = []
    for line in (CONFORMANCE / f"keys_{backbone}.tsv").read_text().splitlines():
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


def synthetic_state_dict(name: str) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """The reference-named state dict for `name` (lite_256 | general_256) and the npz arrays."""
    arrays = dict(np.load(CONFORMANCE / f"{name}.npz"))
    sd = {}
    for key, shape, dtype in read_keys(BACKBONE[name]):
        if dtype.startswith("float"):
            sd[key] = synthetic_tensor(key, shape, FAMILY[name])
        else:
            sd[key] = torch.from_numpy(arrays[f"buffer/{key}"]).reshape(shape)
    return sd, arrays
