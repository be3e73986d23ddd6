"""What a network takes and gives: the input range it expects RGB in and what its last output means.

Every backend is fed float RGB (B,3,h,w) in 0..1 and must return alpha in 0..1. A network differs in two ways
that give silently wrong masks when guessed: how that RGB is scaled for it (``input_range``) and whether its
last output still needs a sigmoid (``output``). BiRefNet takes ImageNet-normalised RGB and returns logits;
MediaPipe's selfie segmenter takes 0..1 and ends in its own LOGISTIC. `NetworkIO` holds both; the ONNX graphs
we export carry them in their metadata (`export.py`), and `OnnxBackend` refuses a graph that says neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

InputRange = Literal["0..1", "0..255", "-1..1", "imagenet"]
OutputKind = Literal["logits", "probability"]
INPUT_RANGES: tuple[InputRange, ...] = get_args(InputRange)
OUTPUT_KINDS: tuple[OutputKind, ...] = get_args(OutputKind)

# (mean, std) on the 0..1 scale per input range: the network gets (rgb - mean) / std.
NORMALISATION: dict[InputRange, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "0..1": ((0.0,), (1.0,)),
    "0..255": ((0.0,), (1 / 255,)),
    "-1..1": ((0.5,), (0.5,)),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


@dataclass(frozen=True)
class NetworkIO:
    input_range: InputRange
    output: OutputKind

    def __post_init__(self):
        if self.input_range not in INPUT_RANGES:
            raise ValueError(f"unknown input range {self.input_range!r}; choose one of {', '.join(INPUT_RANGES)}")
        if self.output not in OUTPUT_KINDS:
            raise ValueError(f"unknown network output {self.output!r}; choose one of {', '.join(OUTPUT_KINDS)}")

    def scaling(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) as (1,C,1,1) float32 tensors on `device`, or None where the input is fed as is (0..1)."""
        if self.input_range == "0..1":
            return None
        mean, std = NORMALISATION[self.input_range]
        return (torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1))

    def alpha(self, last: torch.Tensor) -> torch.Tensor:
        """The network's last output (B,1,h,w) -> float32 alpha in 0..1 (a new tensor where a cast happened)."""
        last = last.float()
        return last.sigmoid_() if self.output == "logits" else last.clamp_(0, 1)


BIREFNET_IO = NetworkIO("imagenet", "logits")


def normalise(x: torch.Tensor, scaling: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """RGB (B,3,h,w) 0..1 -> the network's input range, given `NetworkIO.scaling`."""
    return x if scaling is None else (x - scaling[0]) / scaling[1]
