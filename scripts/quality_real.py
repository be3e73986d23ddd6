#!/usr/bin/env python
"""Temporal smoothing and upsampling measured on real masks of real footage, one JSON object.

    python scripts/quality_real.py                         # selfie on chaplin.mp4, example3.mp4 and stills
    python scripts/quality_real.py --model selfie-landscape --crops /tmp/crops
    python scripts/quality_real.py --save-masks tests/data  # the small real mask sequences the tests replay

The masks come from a trained network (`--model`, default selfie: it ships with the package) run on each frame
through the engine's own stages (`preprocess.to_float`, `preprocess.resize`, the backend), then go through
`smoothing.smooth_streams` at several settings and through `composite.guided_upsample` or bilinear upsampling.

Sequences: the people clips of `../shared/media` (chaplin.mp4, two men walking; example3.mp4, a figure walking
in snow), and two made here from real pictures, so that a ground truth of the motion is known: `still` (a
picture held still under webcam-like sensor noise: every change of its mask is flicker) and `pan` (the same
picture moving `--pan` pixels a frame: every mask edge moves by that much).

Measures, per sequence and setting:
- flicker: mean and 99th percentile of |alpha_t - alpha_(t-1)| over the pixels whose picture barely changed
  (blurred |grey_t - grey_(t-1)| < 0.02, at the mask's resolution), over the pairs of frames whose picture
  changed at all (chaplin.mp4 repeats every third frame; an exact repeat gives the same mask and says nothing).
- lag: how far the smoothed mask's edges trail the raw ones where the picture moved, in pixels of the frame:
  sum |smoothed - raw| / sum |grad raw| over the moving pixels (the area between the two edges over the edge's
  length: a displacement). The raw mask is each frame's own, so it has no lag by construction; on `pan` the lag
  is also given in frames (pixels / speed).
- edges (raw masks only, upsampled to the full frame): the correlation of |grad alpha| with |grad grey| in the
  edge band (does the edge follow the picture's), the gradient energy there (mean |grad alpha|^2, sharper is
  larger) and the soft edge's width in pixels (pixels with 0.05 < alpha < 0.95 over the edge's length).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rmbg_stream.engine import composite  # noqa: E402
from rmbg_stream.engine.mask_metrics import edge_lag, edge_quality, gradient, still_flicker  # noqa: E402
from rmbg_stream.engine.preprocess import resize, to_float  # noqa: E402
from rmbg_stream.engine.setup import load_backend  # noqa: E402
from rmbg_stream.engine.smoothing import DEFAULT_STRENGTH, TemporalSmoother, grey, smooth_streams  # noqa: E402

MEDIA = ROOT.parent / "shared" / "media"
PICTURE = ROOT / "tests" / "data" / "chaplin_150.jpg"

# The gate before issue 18: a coherent alpha change opened it whether or not the picture changed there.
OLD_GATE = {"confirm_low": -2.0, "confirm_high": -1.0}
UNGATED = {"motion_low": 2.0, "motion_high": 3.0, "change_low": 2.0, "change_high": 3.0, "confirm_low": -2.0,
           "confirm_high": -1.0}
# (name, smoothing strength, smoother keyword arguments): raw, the default, and the alternatives weighed.
SETTINGS = [
    ("raw", 0.0, {}),
    (f"default {DEFAULT_STRENGTH}", DEFAULT_STRENGTH, {}),
    ("strength 0.5", 0.5, {}),
    ("strength 1.0", 1.0, {}),
    (f"old gate {DEFAULT_STRENGTH}", DEFAULT_STRENGTH, OLD_GATE),
    ("old default (old gate 0.5)", 0.5, OLD_GATE),
    ("ungated average 0.5", 0.5, UNGATED),
]
EPS = (1e-2, 1e-3, 1e-4)
# --save-masks: the frames [a, b) kept of a sequence. chaplin: one of the two men drops out of the mask for frames
# 34-36 while the picture barely changes. (still and pan are remade by the tests from a shipped picture.)
EXCERPTS = {"chaplin": (31, 41)}


def decode(path: Path, limit: int) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return frames[:limit]


def made_sequences(n: int, pan: int, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """`still`: one picture under sensor noise (sigma 2/255, as a webcam in good light); `pan`: the picture
    moving `pan` pixels a frame to the right (a crop of a wider canvas padded with its edge), with the same noise."""
    rng = np.random.default_rng(seed)
    pic = np.asarray(Image.open(PICTURE).convert("RGB")).astype(np.float32)
    w = pic.shape[1]
    wide = np.pad(pic, ((0, 0), (pan * n, 0), (0, 0)), mode="edge")

    def noisy(x):
        return np.clip(x + rng.normal(0, 2, x.shape), 0, 255).round().astype(np.uint8)

    still = [noisy(pic) for _ in range(n)]
    moving = [noisy(wide[:, pan * (n - t): pan * (n - t) + w]) for t in range(n)]
    return {"still": still, "pan": moving}


def raw_masks(backend, frames: list[np.ndarray], batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,1,h,w) alpha at the network's size and (T,3,h,w) the frames at that size, as the engine makes them."""
    size = backend.input_size(*frames[0].shape[:2])
    smalls, alphas = [], []
    with torch.inference_mode():
        for i in range(0, len(frames), batch):
            x = torch.cat([resize(to_float(torch.from_numpy(f)), size) for f in frames[i:i + batch]])
            smalls.append(x)
            alphas.append(backend(x).float())
    return torch.cat(alphas), torch.cat(smalls)


def smoothed(alphas: torch.Tensor, frames: torch.Tensor, strength: float, params: dict) -> torch.Tensor:
    """The sequence through one stream's smoother, frame by frame, as a live stream runs (frames: RGB or grey)."""
    sm = TemporalSmoother(**params)
    with torch.inference_mode():
        return torch.cat([smooth_streams([sm], alphas[t:t + 1], frames[t:t + 1], [strength])
                          for t in range(alphas.shape[0])])


def rounded(d: dict, digits: int = 5) -> dict:
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in d.items()}


def upsampled(alpha: torch.Tensor, frame: torch.Tensor, how: str, eps: float, radius: int) -> torch.Tensor:
    if how == "bilinear":
        return F.interpolate(alpha, size=frame.shape[-2:], mode="bilinear", align_corners=False).clamp(0, 1)
    return composite.guided_upsample(alpha, frame, radius, eps)


def save_crops(folder: Path, name: str, frame: np.ndarray, versions: dict[str, torch.Tensor], zoom: int = 3) -> None:
    """A crop around the strongest edge of the bilinear mask, the picture then each version's alpha, enlarged."""
    folder.mkdir(parents=True, exist_ok=True)
    first = next(iter(versions.values()))[0, 0]
    g = gradient(first)
    h, w = g.shape
    side = min(96, h, w)
    pooled = F.avg_pool2d(g[None, None], side, stride=max(1, side // 4))[0, 0]
    y, x = divmod(int(pooled.argmax()), pooled.shape[1])
    y0, x0 = min(y * max(1, side // 4), h - side), min(x * max(1, side // 4), w - side)
    tiles = [frame[y0:y0 + side, x0:x0 + side]]
    for a in versions.values():
        m = (a[0, 0, y0:y0 + side, x0:x0 + side].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        tiles.append(np.repeat(m[..., None], 3, 2))
    row = np.concatenate(tiles, 1)
    Image.fromarray(row).resize((row.shape[1] * zoom, row.shape[0] * zoom), Image.NEAREST).save(
        folder / f"{name}.png")
    (folder / f"{name}.txt").write_text("left to right: picture, " + ", ".join(versions) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="selfie")
    ap.add_argument("--clips", default="chaplin.mp4,example3.mp4", help="files in ../shared/media")
    ap.add_argument("--frames", type=int, default=241, help="frames per clip at most")
    ap.add_argument("--made", type=int, default=30, help="frames of the still and pan sequences (0: none)")
    ap.add_argument("--pan", type=int, default=4, help="pan speed, pixels of the picture per frame")
    ap.add_argument("--edge-frames", type=int, default=4, help="frames per sequence for the edge figures")
    ap.add_argument("--crops", type=Path, default=None, help="save edge crops (PNG) here")
    ap.add_argument("--save-masks", type=Path, default=None,
                    help="write real_<sequence>.npz (an excerpt: grey frames and raw masks at the network's size, "
                         "uint8) here")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    backend = load_backend(args.model, "cpu")
    seqs: dict[str, list[np.ndarray]] = {}
    for name in filter(None, args.clips.split(",")):
        if (MEDIA / name).exists():
            seqs[name.rsplit(".", 1)[0]] = decode(MEDIA / name, args.frames)
        else:
            print(f"skipped {name}: not in {MEDIA}", file=sys.stderr)
    if args.made:
        seqs.update(made_sequences(args.made, args.pan))

    report = {"model": args.model, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "torch_threads": torch.get_num_threads(), "sequences": {}}
    for name, frames in seqs.items():
        alphas, smalls = raw_masks(backend, frames)
        h, w = frames[0].shape[:2]
        scale = w / alphas.shape[-1]
        if args.save_masks and name in EXCERPTS:
            a, b = EXCERPTS[name]
            args.save_masks.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(args.save_masks / f"real_{name}.npz", model=args.model, first_frame=a,
                                greys=(grey(smalls[a:b])[:, 0].numpy() * 255).round().astype(np.uint8),
                                alphas=(alphas[a:b, 0].numpy() * 255).round().astype(np.uint8))
        entry = {"frames": len(frames), "size": f"{w}x{h}", "mask": f"{alphas.shape[-1]}x{alphas.shape[-2]}",
                 "smoothing": {}}
        greys = grey(smalls)
        for label, strength, params in SETTINGS:
            out = smoothed(alphas, smalls, strength, params)
            lag = edge_lag(out, alphas, greys)
            row = {"flicker": rounded(still_flicker(out, greys)),
                   "lag_px": None if lag is None else round(lag * scale, 3)}
            if name == "pan" and lag is not None:
                row["lag_frames"] = round(lag * scale / args.pan, 3)
            entry["smoothing"][label] = row
        # Edges: raw masks of a few frames spread over the sequence, each upsampled to the full frame.
        picks = np.linspace(0, len(frames) - 1, args.edge_frames).round().astype(int)
        methods = [("bilinear", "bilinear", 0, 0)] + [(f"guided r2 eps {e:g}", "guided", e, 2) for e in EPS]
        methods.append(("guided r4 eps 1e-3", "guided", 1e-3, 4))
        figures: dict[str, list[dict]] = {m[0]: [] for m in methods}
        for k in picks:
            full = to_float(torch.from_numpy(frames[k]))
            versions = {label: upsampled(alphas[k:k + 1], full, how, eps, r) for label, how, eps, r in methods}
            for label, a in versions.items():
                figures[label].append(edge_quality(a, full))
            if args.crops:
                save_crops(args.crops, f"{name}_{k:03d}", frames[k], versions)
        # Means over the frames that have an edge (a frame with nobody in it has none).
        entry["edges"] = {label: {key: round(float(np.mean(vals)), 4) if (vals := [f[key] for f in rows
                                                                                  if f[key] is not None]) else None
                                  for key in rows[0]} for label, rows in figures.items()}
        report["sequences"][name] = entry
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
