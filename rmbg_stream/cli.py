"""Command line: `rmbg-stream image|transcode|serve|camera`."""

from __future__ import annotations

import argparse
import logging
import sys

DEFAULT_MODEL = "briaai/RMBG-2.0"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id or alias (rmbg-2.0, birefnet, birefnet-lite), a checkpoint file or snapshot "
                        "folder, 'chroma[:COLOUR]' for green/blue screens (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="network precision; half precision needs CUDA (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--resolution", type=int, default=None, metavar="N",
                   help="square network input size, a multiple of 32 (default: the model's own)")


def build_backend(args):
    from .device import pick_device
    from .engine.backends import create_backend

    res = (args.resolution, args.resolution) if args.resolution else None
    return create_backend(args.model, pick_device(args.device), args.precision, res)


def cmd_image(args) -> int:
    from . import image
    from .engine.composite import parse_background

    background = parse_background(args.background) if args.background else None
    backend = build_backend(args)
    failures = image.run(backend, args.inputs, args.output, mask=args.mask, background=background)
    if failures:
        print(f"error: {failures} input(s) failed", file=sys.stderr)
    return 1 if failures else 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmbg-stream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("image", help="remove the background of images (files or folders)")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="output file (one input) or folder")
    p.add_argument("--mask", action="store_true", help="write the grey mask instead of a cut-out")
    p.add_argument("--background", help="COLOR (#rrggbb or name), IMAGE path or 'blur' (default: transparent PNG)")
    add_model_args(p)
    p.set_defaults(func=cmd_image)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
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
