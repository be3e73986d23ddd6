#!/usr/bin/env python
"""Our eager BiRefNet against BiRefNet's own code, same weights and inputs, alternating; one JSON object.

    git clone https://github.com/ZhengPeng7/BiRefNet /path/to/BiRefNet   # plus: pip install einops timm
    python scripts/bench_reference.py --reference /path/to/BiRefNet --backbone swin_v1_t --size 512 --iters 5
    python scripts/bench_reference.py --reference /path/to/BiRefNet --size 256 --batch 2 --threads 2
    python scripts/bench_reference.py --reference /path/to/BiRefNet --device cuda --precision fp16

The reference is the user's own clone, imported from `--reference` as its inference.py does
(`models.birefnet.BiRefNet(bb_pretrained=False)`); nothing of it is copied here. Its `Config` is told the
backbone after it is built (its file picks one by list index), and nothing else of it is changed. `kornia`
(only the training-time gradient labels) and the clone's `dataset.py` (data loading) are replaced by
stand-ins only when they fail to import.

Both networks get one random state dict (ours, with every tensor drawn from a seeded generator so the
deformable offsets are not the zero they start at), loaded into the reference with `strict=True` after
moving the patch convolutions to the clone's patch order (read from its code: models.weights). Timed
forwards alternate model by model, and which model goes first alternates by iteration, so drift in the
machine's speed weighs on both alike. `fps` is batch / median seconds per forward; `ratio` is ours over
the reference; `max_abs_diff` compares the final logits (B, 1, H, W) of the first forward of each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from rmbg_stream.device import pick_device, pick_dtype
from rmbg_stream.models import BACKBONES, BiRefNet
from rmbg_stream.models.weights import convert_patch_order, order_in_text

SEED = 0
# What BiRefNet's config.py lists per backbone (stage channels, deepest first), before the 'cat' doubling.
LATERAL_CHANNELS = {
    "swin_v1_t": [768, 384, 192, 96],
    "swin_v1_s": [768, 384, 192, 96],
    "swin_v1_b": [1024, 512, 256, 128],
    "swin_v1_l": [1536, 768, 384, 192],
}


class ReferenceUnusable(Exception):
    """The reference clone cannot be used; the message is one line."""


def check_reference(folder: Path) -> Path:
    """The clone's models/birefnet.py, or ReferenceUnusable saying what is missing."""
    code = folder / "models" / "birefnet.py"
    if not folder.is_dir():
        raise ReferenceUnusable(f"reference folder {folder} does not exist: pass a clone of "
                              "https://github.com/ZhengPeng7/BiRefNet")
    if not code.is_file() or not (folder / "config.py").is_file():
        raise ReferenceUnusable(f"{folder} is not a BiRefNet clone: models/birefnet.py or config.py is missing")
    return code


def stub_if_missing(name: str, **attrs) -> None:
    """Put a stand-in module `name` with `attrs` in sys.modules when the real one does not import."""
    try:
        __import__(name)
    except Exception:  # noqa: BLE001 - any failure (missing package, its own imports) gets the stand-in
        parent, _, child = name.rpartition(".")
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        if parent:
            sys.modules.setdefault(parent, types.ModuleType(parent))
            setattr(sys.modules[parent], child, module)


def training_only(*args, **kwargs):
    raise RuntimeError("training-only stand-in called during inference")


def load_reference_class(folder: Path, backbone: str):
    """BiRefNet's own `BiRefNet` class from the clone, its Config set to `backbone`."""
    sys.path.insert(0, str(folder))
    stub_if_missing("kornia.filters", laplacian=training_only)
    stub_if_missing("dataset", class_labels_TR_sorted=[])
    import config as ref_config  # the clone's config.py

    build = ref_config.Config.__init__

    def init(self, *args, **kwargs):
        build(self, *args, **kwargs)
        self.bb = backbone
        channels = LATERAL_CHANNELS[backbone]
        self.lateral_channels_in_collection = [c * 2 for c in channels] if self.mul_scl_ipt == "cat" else channels
        self.cxt = self.lateral_channels_in_collection[1:][::-1][-self.cxt_num:] if self.cxt_num else []

    ref_config.Config.__init__ = init
    try:
        from models.birefnet import BiRefNet as Reference
    except ImportError as err:
        raise ReferenceUnusable(f"the reference does not import ({err}); install its requirements, "
                              "e.g. pip install einops timm") from err
    return Reference


def random_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every float tensor of `model` drawn from one seeded generator; integer buffers kept."""
    g = torch.Generator().manual_seed(SEED)
    out = {}
    for key, t in model.state_dict().items():
        if not t.is_floating_point():
            out[key] = t
        elif key.endswith("running_var"):
            out[key] = torch.rand(t.shape, generator=g) * 1.5 + 0.5
        elif t.dim() >= 2:
            out[key] = torch.randn(t.shape, generator=g) * math.sqrt(1.0 / max(1, t[0].numel()))
        else:
            out[key] = 1.0 + 0.1 * torch.randn(t.shape, generator=g) if key.endswith("weight") \
                else 0.05 * torch.randn(t.shape, generator=g)
    return out


def load_strict(ref: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    own, theirs = set(sd), set(ref.state_dict())
    if own != theirs:
        missing, extra = sorted(theirs - own), sorted(own - theirs)
        raise ReferenceUnusable(f"state-dict keys differ: reference lacks {extra[:5]} ({len(extra)}), "
                              f"ours lacks {missing[:5]} ({len(missing)})")
    ref.load_state_dict(sd, strict=True)


def build_pair(args, device: torch.device, dtype: torch.dtype) -> tuple[dict[str, torch.nn.Module], str]:
    """{'ours': ..., 'reference': ...} with one set of weights, and the clone's patch order."""
    code = check_reference(args.reference)
    order = order_in_text(code.read_text(encoding="utf-8", errors="replace")) or "legacy"
    Reference = load_reference_class(args.reference, args.backbone)
    ours = BiRefNet(args.backbone).eval()
    sd = random_state(ours)
    ours.load_state_dict(sd, strict=True)
    ref = Reference(bb_pretrained=False).eval()
    load_strict(ref, convert_patch_order(sd, "legacy", order))
    return {"ours": ours.to(device, dtype), "reference": ref.to(device, dtype)}, order


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    t0 = time.perf_counter()
    out = model(x)[-1]
    sync(device)
    return time.perf_counter() - t0, out


def run(models: dict[str, torch.nn.Module], x: torch.Tensor, args, device: torch.device) -> dict:
    """Warm-up, then alternate timed forwards; medians, fps and the outputs' max |diff|."""
    names = list(models)
    with torch.inference_mode():
        first = {name: timed(m, x, device)[1].float().cpu() for name, m in models.items()}
        for _ in range(args.warmup):
            for m in models.values():
                timed(m, x, device)
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(args.iters):
            for name in names if i % 2 == 0 else names[::-1]:
                times[name].append(timed(models[name], x, device)[0])
    report = {}
    for name in names:
        med = statistics.median(times[name])
        report[name] = {"fps": round(args.batch / med, 3), "median_s": round(med, 4),
                        "times_s": [round(t, 4) for t in times[name]]}
    report["ratio"] = round(report["ours"]["fps"] / report["reference"]["fps"], 3)
    report["max_abs_diff"] = float((first["ours"] - first["reference"]).abs().max())
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", type=Path, required=True, help="a clone of github.com/ZhengPeng7/BiRefNet")
    p.add_argument("--backbone", default="swin_v1_t", choices=BACKBONES)
    p.add_argument("--size", type=int, default=512, help="square input side, a multiple of 32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=5, help="timed forwards of each model")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards of each model after the first")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    args = p.parse_args(argv)
    if args.size <= 0 or args.size % 32 or args.batch < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--size must be a positive multiple of 32, --batch and --iters at least 1, --warmup at least 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.reference = args.reference.expanduser().resolve()
    try:
        device = pick_device(args.device)
        dtype = pick_dtype(args.precision, device)
        if args.threads:
            torch.set_num_threads(args.threads)
        models, order = build_pair(args, device, dtype)
    except (ReferenceUnusable, ValueError) as err:
        print(f"bench_reference: {err}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(SEED + 1)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device, dtype)
    result = {
        "backbone": args.backbone, "size": args.size, "batch": args.batch, "device": str(device),
        "precision": args.precision, "threads": torch.get_num_threads(), "iters": args.iters,
        "reference_dir": str(args.reference), "patch_order": order, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "loadavg": [round(v, 2) for v in os.getloadavg()],
    }
    result.update(run(models, x, args, device))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
