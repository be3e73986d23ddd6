"""Known checkpoints: which backbone, input size and patch order each hub repository was trained for.

The backbone is checked against the checkpoint itself when it loads; the resolution is the
size the model was trained at, which the engine uses as its default input size.

The patch order is how the decoder's image-patch inputs (`ipt_blk2..5`) stack the g x g grid of
patches on the channel axis; a checkpoint only gives right masks in the order it was trained with:
- ``legacy``: BiRefNet up to commit 5198d3f (2024-11-05) and the code bundled with RMBG-2.0,
  einops ``b c (hg h) (wg w) -> b (wg hg c) h w``;
- ``current``: BiRefNet since then, ``b c (hg h) (wg w) -> b (c hg wg) h w``.
The entries below go by release date; the code bundled with a hub snapshot overrides them (see weights.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

MIT = "MIT"
BRIA_NC = "CC BY-NC 4.0"

PatchOrder = Literal["legacy", "current"]
PATCH_ORDERS: tuple[PatchOrder, ...] = get_args(PatchOrder)


@dataclass(frozen=True)
class ModelSpec:
    repo_id: str
    backbone: str
    resolution: tuple[int, int]  # (h, w)
    gated: bool
    licence: str
    description: str
    patch_order: PatchOrder
    # Trained on many sizes and aspect ratios (multiples of 32): frames keep their aspect at the network.
    dynamic: bool = False

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


def _spec(repo_id: str, backbone: str, side: int | tuple[int, int], order: PatchOrder, description: str,
          gated: bool = False, licence: str = MIT, dynamic: bool = False) -> ModelSpec:
    resolution = (side, side) if isinstance(side, int) else side
    return ModelSpec(repo_id, backbone, resolution, gated, licence, description, order, dynamic)


# fmt: off
MODELS: dict[str, ModelSpec] = {s.repo_id: s for s in (
    _spec("briaai/RMBG-2.0", "swin_v1_l", 1024, "legacy",
          "BRIA background removal; non-commercial, accept the licence on the hub first", gated=True, licence=BRIA_NC),
    _spec("ZhengPeng7/BiRefNet", "swin_v1_l", 1024, "legacy", "BiRefNet general dichotomous segmentation"),
    _spec("ZhengPeng7/BiRefNet_lite", "swin_v1_t", 1024, "legacy", "BiRefNet, Swin-T backbone, several times faster"),
    _spec("ZhengPeng7/BiRefNet_lite-2K", "swin_v1_t", (1440, 2560), "legacy", "BiRefNet lite trained at 2560x1440"),
    _spec("ZhengPeng7/BiRefNet-matting", "swin_v1_l", 1024, "legacy", "BiRefNet trimap-free matting (soft alpha)"),
    _spec("ZhengPeng7/BiRefNet-portrait", "swin_v1_l", 1024, "legacy", "BiRefNet tuned for people (P3M-10k, humans)"),
    _spec("ZhengPeng7/BiRefNet_HR", "swin_v1_l", 2048, "current", "BiRefNet general trained at 2048x2048"),
    _spec("ZhengPeng7/BiRefNet_HR-matting", "swin_v1_l", 2048, "current", "BiRefNet matting trained at 2048x2048"),
    _spec("ZhengPeng7/BiRefNet_dynamic", "swin_v1_l", 1024, "current", "BiRefNet trained on sizes from 256 to 2304",
          dynamic=True),
    _spec("ZhengPeng7/BiRefNet_512x512", "swin_v1_l", 512, "current", "BiRefNet general trained at 512x512"),
)}
# fmt: on

ALIASES: dict[str, str] = {
    "rmbg-2.0": "briaai/RMBG-2.0",
    "birefnet": "ZhengPeng7/BiRefNet",
    "birefnet-lite": "ZhengPeng7/BiRefNet_lite",
}

# Hub ids are matched case-insensitively because the hub itself resolves them that way.
_BY_KEY = {k.lower(): MODELS[v] for k, v in ALIASES.items()} | {k.lower(): v for k, v in MODELS.items()}


_BY_NAME = {k.split("/", 1)[1].lower(): v for k, v in MODELS.items()}


def lookup(name: str) -> ModelSpec | None:
    """The spec of a known hub id or alias (any case), else None."""
    return _BY_KEY.get(name.strip().lower())


def lookup_name(name: str) -> ModelSpec | None:
    """Like lookup, and also by the repository's own name (`BiRefNet_HR`), as a local file or folder is named."""
    return lookup(name) or _BY_NAME.get(name.strip().lower())
