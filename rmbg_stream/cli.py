"""Command line: `rmbg-stream image|transcode|serve|camera`."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .engine.setup import build_backend, check_background

DEFAULT_MODEL = "briaai/RMBG-2.0"
# engine.smoothing.DEFAULT_STRENGTH, written out so that --help does not import torch (a test holds them equal).
SMOOTHING = 0.8
DESCRIPTION = """\
Remove or replace the background of pictures, video files and live video with RMBG-2.0 / BiRefNet, or with
MediaPipe's selfie segmenter (--model selfie or selfie-landscape: people only, shipped with rmbg-stream, runs offline
with no download, live on a CPU; serve and camera use it by default without CUDA).
The file commands default to RMBG-2.0: the first run downloads it (about 900 MB) from the Hugging Face hub, and it is
gated: accept its licence at https://huggingface.co/briaai/RMBG-2.0 and set HF_TOKEN first, or pass --model FILE,
--model selfie, or --model chroma for a green screen (no model at all).

examples:
  rmbg-stream image photo.jpg -o cut.png                 a cut-out with transparency (RMBG-2.0)
  rmbg-stream image photo.jpg --model selfie -o cut.png  the same with the shipped person segmenter, offline
  rmbg-stream transcode talk.mp4 -o talk.webm            a video without its background (audio kept)
  rmbg-stream serve                                      the browser page, at http://127.0.0.1:8080
  rmbg-stream camera --output window --background blur   the local camera, background blurred, in a window
  rmbg-stream export birefnet-lite -o lite.onnx          an ONNX graph, then --model lite.onnx (onnxruntime)

`rmbg-stream COMMAND --help` lists each command's options."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id or alias (rmbg-2.0, birefnet, birefnet-lite), a checkpoint file or snapshot "
                        "folder, selfie or selfie-landscape (MediaPipe's person segmenter, 256x256 or 256x144: "
                        "shipped, offline, no download), a .onnx graph (rmbg-stream export), "
                        "'chroma[:COLOUR|auto]' for green/blue screens (auto: the key is learned from the "
                        "frame borders) (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="network precision (default: fp16 on CUDA, fp32 on CPU); fp16 needs CUDA; bf16 also runs "
                        "on CPUs with native bf16 (AVX512-BF16, AMX, Arm BF16), where it is about 1.2x faster than "
                        "fp32 (Swin-T, AVX512-BF16), at a small cost in accuracy")
    p.add_argument("--resolution", default=None, metavar="N|WxH",
                   help="network input size, multiples of 32: N for N x N, or WxH such as 1024x576 to keep a 16:9 "
                        "frame's aspect (default: the model's own; BiRefNet_dynamic keeps each frame's aspect)")
    p.add_argument("--patch-order", default=None, choices=["legacy", "current"],
                   help="patch order the checkpoint was trained with: legacy (RMBG-2.0, BiRefNet before 2024-11) or "
                        "current (newer BiRefNet code) (default: from the code bundled with the checkpoint, else "
                        "the model table, else legacy)")
    p.add_argument("--runtime", default="auto", choices=["auto", "eager", "compile", "onnx"],
                   help="how the network runs: eager PyTorch, compile (torch.compile, compiled once per size and "
                        "batch, cached on disk), onnx (onnxruntime; a checkpoint is exported once into the cache) or "
                        "auto (the fastest measured for the device; see README, Runtimes) (default: %(default)s)")
    p.add_argument("--input-range", default=None, choices=["0..1", "0..255", "-1..1", "imagenet"],
                   help="a .onnx graph without rmbg-stream's metadata: the range its RGB input takes (imagenet: "
                        "ImageNet mean/std); give --model-output too (default: from the graph's metadata)")
    p.add_argument("--model-output", default=None, choices=["logits", "probability"],
                   help="a .onnx graph without rmbg-stream's metadata: whether its last output is logits (a "
                        "sigmoid is applied) or already an alpha in 0..1 (default: from the graph's metadata)")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """`transcode --cluster`: rmbg_stream/cluster.py (needs the `cluster` extra, Ray)."""
    g = p.add_argument_group("cluster (Ray; pip install 'rmbg-stream[cluster]')")
    g.add_argument("--cluster", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster: ADDRESS, else RAY_ADDRESS, else a local Ray instance; INPUT may also "
                        "be a .txt file listing inputs; paths must be visible to every node "
                        "(default: off, one process)")
    g.add_argument("--cluster-workers", type=int, default=0,
                   help="worker actors (default: one per GPU, else CPUs / --cluster-cpus)")
    g.add_argument("--cluster-cpus", type=float, default=1.0, help="CPUs per worker without GPUs (default: 1)")
    g.add_argument("--segment-seconds", type=float, default=60.0,
                   help="videos longer than this are cut at keyframes into segments run in parallel (default: 60)")
    g.add_argument("--retries", type=int, default=2,
                   help="times a file or segment is run again after its worker died (default: 2)")


def cmd_image(args) -> int:
    from . import image
    from .engine.composite import parse_background

    background = parse_background(args.background) if args.background else None
    check_background(args.background)
    jobs = image.plan(args.inputs, args.output, mask=args.mask, background=background)
    jobs, failures = image.readable(jobs)  # pixel limits and unreadable files, before the model loads
    if jobs:
        failures += image.run(build_backend(args), jobs, mask=args.mask, background=background)
    if failures:
        print(f"error: {failures} input(s) failed", file=sys.stderr)
    return 1 if failures else 0


def cmd_transcode(args) -> int:
    from .transcode import run_cli

    check_background(args.background)
    return run_cli(args)


# Live commands (serve, camera) without --model: by the device type they will run on. RMBG-2.0 (Swin-L at 1024) gives
# well under 1 fps on a CPU; the selfie segmenter runs at 30 fps and more there, and ships inside the package.
LIVE_DEFAULT = {"cuda": DEFAULT_MODEL}
LIVE_FALLBACK = "selfie"
LIVE_MODEL_HELP = (f"(default: {DEFAULT_MODEL} on CUDA, else {LIVE_FALLBACK}, MediaPipe's selfie segmenter, "
                   "shipped with rmbg-stream: RMBG-2.0 gives well under 1 fps on a CPU)")


def live_default_model(device_type: str) -> str:
    """The model `serve` and `camera` run when no --model is given, for a device type ("cuda", "cpu", ...)."""
    return LIVE_DEFAULT.get(device_type, LIVE_FALLBACK)


def choose_live_model(args) -> str:
    """--model's default for a live command, decided on the device it will run on; says so in one line on stderr
    when it is not RMBG-2.0."""
    from .device import pick_device

    device = pick_device(args.device)
    model = live_default_model(device.type)
    if model != DEFAULT_MODEL:
        why = "no CUDA device" if args.device == "auto" else f"--device {args.device}"
        print(f"rmbg-stream: {why}, so live video runs --model {model} (RMBG-2.0 gives well under 1 fps on the "
              f"{device.type.upper()}); choose another with --model NAME, e.g. --model {DEFAULT_MODEL}",
              file=sys.stderr, flush=True)
    return model


def cmd_serve(args) -> int:
    from .server.app import run_cli

    check_background(args.background)
    if not args.model:
        args.model = [choose_live_model(args)]
    return run_cli(args)


def cmd_camera(args) -> int:
    from .camera import run_cli

    check_background(args.background)
    # Chosen when the model loads, after the camera or file has opened: a missing input is the one line printed.
    return run_cli(args, default_model=choose_live_model)


def command(sub, name: str, text: str, **options) -> argparse.ArgumentParser:
    """A subcommand whose one-line summary is also the top of its own --help."""
    return sub.add_parser(name, help=text, description=text, **options)


def cmd_export(args) -> int:
    from .export import export_onnx

    result = export_onnx(args.model, args.output, args.resolution, args.batch, args.patch_order)
    h, w = result.resolution
    batch = "dynamic" if result.batch is None else result.batch
    print(f"wrote {result.path}: {w}x{h}, batch {batch}, {result.deform_nodes} DeformConv nodes, "
          f"{result.size_mb:.0f} MB, in {result.seconds:.1f} s")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmbg-stream", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log more: model loading, hub requests, WebRTC connection states, HTTP access log")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, help="what to do; each command has its own --help")

    p = command(sub, "image", "remove the background of images (files or folders)")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="output file (one input) or folder")
    p.add_argument("--mask", action="store_true", help="write the grey mask instead of a cut-out")
    p.add_argument("--background", help="COLOR (#rrggbb or name), IMAGE path or 'blur' (default: transparent PNG)")
    add_model_args(p)
    p.set_defaults(func=cmd_image)

    # -- transcode (rmbg_stream/transcode.py)
    p = command(sub, "transcode", "replace or remove the background of video files (audio kept)")
    p.add_argument("input", help="video file or folder")
    p.add_argument("-o", "--output", required=True, help="output file (.mp4 .mkv .mov .webm, or a folder for PNGs)")
    p.add_argument("--background", default=None,
                   help="COLOR, IMAGE, VIDEO, blur[:S], transparent (default: transparent for .mov/.webm/PNG, "
                        "else green #00b140)")
    p.add_argument("--format", default=None, choices=["mp4", "mkv", "mov", "webm", "png"],
                   help="output type when INPUT is a folder (default: mp4)")
    p.add_argument("--mask", action="store_true", help="write the grey mask as video")
    p.add_argument("--smoothing", type=float, default=SMOOTHING, help="temporal smoothing 0..1 (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="frames per network batch (default: %(default)s)")
    p.add_argument("--codec", default=None, help="video codec (default: by container)")
    p.add_argument("--crf", type=int, default=None,
                   help="quality for x264/x265/VP9, lower is better (default: the codec's own)")
    p.add_argument("--decontaminate", action="store_true", help="clean the old background's colour off edges")
    p.add_argument("--allow-truncated", action="store_true",
                   help="keep what can be read of an input that ends before its container says (default: an error)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    add_model_args(p)
    add_cluster_args(p)
    p.set_defaults(func=cmd_transcode)

    # -- serve (rmbg_stream/server/)
    # "resolve": serve and camera replace add_model_args' --model with their own (several models; the live default).
    p = command(sub, "serve", "live server: browser page, WebRTC, WebSocket, OBS source", conflict_handler="resolve")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every address (needs --token) (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="TCP port, 0 for any free one (default: %(default)s)")
    p.add_argument("--background", default="blur", help="what a new session starts with (default: %(default)s)")
    p.add_argument("--max-sessions", type=int, default=8,
                   help="cameras and OBS views served at once; more are refused (default: %(default)s)")
    p.add_argument("--token", default=None,
                   help="secret that clients must send; required when binding to a non-loopback address "
                        "(default: none)")
    p.add_argument("--batch", type=int, default=4, help="max frames per network batch (default: %(default)s)")
    p.add_argument("--tls", choices=["self-signed"], default=None,
                   help="serve HTTPS with a certificate made at start for this machine's names and addresses (its "
                        "fingerprint is printed): browsers on other machines get the camera only over HTTPS "
                        "(default: plain HTTP)")
    p.add_argument("--tls-cert", metavar="FILE", default=None,
                   help="serve HTTPS with this PEM certificate (chain) (default: none)")
    p.add_argument("--tls-key", metavar="FILE", default=None, help="the PEM private key of --tls-cert (default: none)")
    add_model_args(p)
    p.add_argument("--model", nargs="+", action="extend", default=None, metavar="M",
                   help="the model(s) to serve, as for the other commands; several (--model selfie chroma, or "
                        "--model repeated) load one engine each, and every session can switch between them from "
                        "the page or with the 'model' control; sessions start with the first " + LIVE_MODEL_HELP)
    p.set_defaults(func=cmd_serve)

    # -- camera (rmbg_stream/camera.py)
    p = command(sub, "camera", "local camera to a virtual camera, a file or a window", conflict_handler="resolve")
    p.add_argument("--input", default=None, help="camera device, video file or URL (default: the first camera)")
    p.add_argument("--output", default="vcam", help="vcam, window, or an output file (default: %(default)s)")
    p.add_argument("--background", default="blur",
                   help="COLOR, IMAGE, blur[:S], or transparent for a .mov/.webm/PNG output "
                        "(default: %(default)s)")
    p.add_argument("--smoothing", type=float, default=SMOOTHING, help="temporal smoothing 0..1 (default: %(default)s)")
    p.add_argument("--fps", type=float, default=None, help="capture/output frame rate (default: the input's)")
    p.add_argument("--size", default=None, metavar="WxH", help="capture size (default: the camera's)")
    add_model_args(p)
    p.add_argument("--model", default=None, metavar="M",
                   help="the model, as for the other commands (hub id, alias, file, chroma, selfie) " + LIVE_MODEL_HELP)
    p.set_defaults(func=cmd_camera)

    # -- export (rmbg_stream/export.py)
    p = command(sub, "export", "write a model as an ONNX graph for --model FILE.onnx (onnxruntime)")
    p.add_argument("model", help="hub id, alias, checkpoint file or snapshot folder (as --model takes it)")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--resolution", default=None, metavar="N|WxH",
                   help="input size of the graph, multiples of 32 (default: the model's own)")
    p.add_argument("--batch", default="1", metavar="N|dynamic",
                   help="frames per call: fixed N, or dynamic (any batch) (default: %(default)s)")
    p.add_argument("--patch-order", default=None, choices=["legacy", "current"],
                   help="patch order the checkpoint was trained with (default: as for the other commands)")
    p.set_defaults(func=cmd_export)
    return parser


def setup_logging(verbose: bool) -> None:
    """One handler, on the root logger, for every library: each line is printed once."""
    from huggingface_hub.utils import logging as hf_logging

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    # huggingface_hub gives its loggers a handler of their own and still propagates to the root: with -v every line
    # of it came out twice, plain and as "WARNING: ...".
    hub = hf_logging.get_logger()
    for handler in list(hub.handlers):
        hub.removeHandler(handler)
    if not verbose:
        # The hub client logs every retry; the one line that matters is the WeightsError we print.
        hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    setup_logging(args.verbose)
    from .models.weights import WeightsError

    try:
        return args.func(args)
    except (WeightsError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
