#!/usr/bin/env python
"""bf16 sensitivity of BiRefNet per module group, against a conformance vector: one JSON object a line.

    python scripts/precision_study.py lite_256                        # every group, both modes
    python scripts/precision_study.py general_256 --keep-fp32 layernorms,batchnorms decoder

Per group (named module sets: patch embed, each Swin stage and its attention / MLP / merging, all LayerNorms,
the decoder blocks, ASPP offsets, ...) it reports the group's share of the network's FLOPs (convolutions,
linear layers, deformable convolutions, attention products) and the mask error, mean and max of
|sigmoid(run) - sigmoid(fp32 vector)|, in two modes: ``only`` (the group in bf16, the rest fp32) and ``except``
(everything in bf16 but the group, whose parameters stay fp32 and whose float inputs are cast up and outputs
back). ``--keep-fp32`` instead measures ``except`` for unions of groups (comma-joined), one per argument.
The first line gives the all-bf16 error and the error of rounding only the parameters and input to bf16.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.conformance builds the synthetic weights

from rmbg_stream.models import BiRefNet  # noqa: E402
from rmbg_stream.models.blocks import DeformableConv2d  # noqa: E402
from rmbg_stream.models.swin import WindowAttention  # noqa: E402
from tests.conformance import BACKBONE, synthetic_state_dict  # noqa: E402

BF16 = torch.bfloat16
MODES = ("only", "except")


def groups(nstages: int) -> dict:
    """Group name -> full-match regex on module names, or a predicate (name, module) -> bool."""
    g = {
        "patch_embed": r"bb\.patch_embed",
        "layernorms": lambda n, m: isinstance(m, nn.LayerNorm),
        "batchnorms": lambda n, m: isinstance(m, nn.BatchNorm2d),
        "squeeze": r"squeeze_module",
        "ipt_blks": r"decoder\.ipt_blk\d",
        "ipt_blk1": r"decoder\.ipt_blk1",
        "lateral": r"decoder\.lateral_block\d",
        "gdt": r"decoder\.gdt_convs(_attn)?_\d",
        "conv_out1": r"decoder\.conv_out1",
        "aspp_offsets": r".*\.(offset_conv|modulator_conv)",
        "aspp": r".*\.dec_att",
        "dec_conv_in_out": r"(decoder\.decoder_block\d|squeeze_module\.0)\.(conv_in|conv_out)",
    }
    g.update({f"decoder_block{i}": rf"decoder\.decoder_block{i}" for i in range(4, 0, -1)})
    for i in range(nstages):
        blocks = rf"bb\.layers\.{i}\.blocks\.\d+"
        g |= {f"stage{i}": rf"bb\.layers\.{i}|bb\.norm{i}", f"stage{i}.attn": blocks + r"\.attn",
              f"stage{i}.qkv": blocks + r"\.attn\.qkv", f"stage{i}.proj": blocks + r"\.attn\.proj",
              f"stage{i}.mlp": blocks + r"\.mlp", f"stage{i}.merge": rf"bb\.layers\.{i}\.downsample"}
    return g | {"encoder": r"bb", "decoder": r"decoder|squeeze_module"}


def select(model: nn.Module, preds: list) -> list[str]:
    """The top-most module names that match any of `preds`."""
    tests = [p if callable(p) else (lambda rx: lambda n, m: rx.fullmatch(n) is not None)(re.compile(p)) for p in preds]
    picked: list[str] = []
    for n, m in model.named_modules():
        if n and any(t(n, m) for t in tests) and not any(n.startswith(p + ".") for p in picked):
            picked.append(n)
    return picked


def flops(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Multiply-add FLOPs (x2) per module name for one forward of `x`."""
    out: dict[str, int] = {}

    def hook(n):
        def count(m, args, y):
            if isinstance(m, nn.Conv2d):
                out[n] = out.get(n, 0) + 2 * y.numel() * m.in_channels // m.groups * m.weight[0, 0].numel()
            elif isinstance(m, nn.Linear):
                out[n] = out.get(n, 0) + 2 * y.numel() * m.in_features
            elif isinstance(m, DeformableConv2d):
                out[n] = out.get(n, 0) + 2 * y.numel() * m.regular_conv.weight[0].numel()
            elif isinstance(m, WindowAttention):
                B, nW, N, C = args[0].shape
                out[n] = out.get(n, 0) + 4 * B * nW * N * N * C  # q @ k^T and attn @ v
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()]
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return out


def share(fl: dict[str, int], names: list[str]) -> float:
    return sum(v for k, v in fl.items() if any(k == n or k.startswith(n + ".") for n in names)) / sum(fl.values())


def cast(value, dtype: torch.dtype):
    if isinstance(value, (list, tuple)):
        return type(value)(cast(v, dtype) for v in value)
    return value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value


def run_in(module: nn.Module, dtype: torch.dtype) -> None:
    """Hooks that run `module` in `dtype`: float inputs cast to it, outputs cast back to the caller's dtype."""
    caller: list[torch.dtype] = []

    def pre(mod, args, kwargs):
        floats = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
                  if torch.is_tensor(t) and t.is_floating_point()]
        caller[:] = [floats[0].dtype]
        return cast(args, dtype), cast(kwargs, dtype)

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(lambda mod, args, out: cast(out, caller[0]))


def error(model: BiRefNet, x: torch.Tensor, ref: torch.Tensor, mode: str, names: list[str]) -> dict:
    """Mask error of a copy of `model` run in `mode` (see the module docstring, plus ``rounded``: fp32 compute on
    bf16-rounded parameters and input)."""
    m = copy.deepcopy(model)
    mods, orig = dict(m.named_modules()), dict(model.named_modules())
    if mode == "only":
        for n in names:
            run_in(mods[n].to(BF16), BF16)
    elif mode == "except":
        m.to(BF16)
        x = x.to(BF16)
        for n in names:
            mods[n].to(torch.float32).load_state_dict(orig[n].state_dict())
            run_in(mods[n], torch.float32)
    else:
        with torch.no_grad():
            for t in [*m.parameters(), *m.buffers()]:
                if t.is_floating_point():
                    t.copy_(t.to(BF16).float())
        x = x.to(BF16).float()
    with torch.inference_mode():
        d = (m(x)[-1].float().sigmoid() - ref).abs()
    return {"mean": float(f"{d.mean().item():.3g}"), "max": float(f"{d.max().item():.3g}"),
            "finite": bool(torch.isfinite(d).all())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("vector", choices=sorted(BACKBONE))
    p.add_argument("--size", type=int, help="resize the input to this square size; reference = our fp32 there")
    p.add_argument("--groups", help="comma-separated subset of the groups (default: all)")
    p.add_argument("--keep-fp32", nargs="+", metavar="GROUP[,GROUP...]", help="measure these unions instead")
    args = p.parse_args()
    sd, arrays = synthetic_state_dict(args.vector)
    model = BiRefNet(BACKBONE[args.vector]).eval()
    model.load_state_dict(sd, strict=True)
    x, ref = torch.from_numpy(arrays["input"]), torch.from_numpy(arrays["out3"]).sigmoid()
    if args.size:
        x = F.interpolate(x, size=(args.size, args.size), mode="bilinear", align_corners=False)
        with torch.inference_mode():
            ref = model(x)[-1].sigmoid()
    fl, table = flops(model, x), groups(len(model.bb.layers))
    print(json.dumps({"vector": args.vector, "size": list(x.shape[2:]), "gflops": round(sum(fl.values()) / 1e9, 2),
                      "all_bf16": error(model, x, ref, "except", []),
                      "rounded_parameters_only": error(model, x, ref, "rounded", [])}), flush=True)
    if args.keep_fp32:
        for spec in args.keep_fp32:
            names = select(model, [table[g] for g in spec.split(",")])
            print(json.dumps({"fp32": spec, "flops": round(share(fl, names), 4),
                              "except": error(model, x, ref, "except", names)}), flush=True)
        return
    for g, pred in table.items():
        if args.groups and g not in args.groups.split(","):
            continue
        names = select(model, [pred])
        row = {"group": g, "modules": len(names), "flops": round(share(fl, names), 4)}
        print(json.dumps(row | {mode: error(model, x, ref, mode, names) for mode in MODES}), flush=True)


if __name__ == "__main__":
    main()
