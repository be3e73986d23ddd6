"""Known checkpoints: which backbone and input size each hub repository was trained for.

The backbone is checked against the checkpoint itself when it loads; the resolution is the
size the model was trained at, which the engine uses as its default input size.
"""

from __future__ import annotations

from dataclasses import dataclass

MIT = "MIT"
BRIA_NC = "CC BY-NC 4.0"


@dataclass(frozen=True)
class ModelSpec:
    repo_id: str
    backbone: str
    resolution: tuple[int, int]  # (h, w)
    gated: bool
    licence: str
    description: str
    # Trained on many sizes and aspect ratios (multiples of 32): frames keep their aspect at the network.
    dynamic: bool = False

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


def _spec(
    repo_id: str, backbone: str, side: int | tuple[int, int], description: str, gated: bool = False, licence: str = MIT,
    dynamic: bool = False,
) -> ModelSpec:
    resolution = (side, side) if isinstance(side, int) else side
    return ModelSpec(repo_id, backbone, resolution, gated, licence, description, dynamic)


MODELS: dict[str, ModelSpec] = {
    s.repo_id: s
    for s in (
        _spec(
            "briaai/RMBG-2.0",
            "swin_v1_l",
            1024,
            "BRIA background removal; non-commercial, accept the licence on the hub first",
            gated=True,
            licence=BRIA_NC,
        ),
        _spec("ZhengPeng7/BiRefNet", "swin_v1_l", 1024, "BiRefNet general dichotomous segmentation"),
        _spec("ZhengPeng7/BiRefNet_lite", "swin_v1_t", 1024, "BiRefNet with the Swin-T backbone, several times faster"),
        _spec("ZhengPeng7/BiRefNet_lite-2K", "swin_v1_t", (1440, 2560), "BiRefNet lite trained at 2560x1440"),
        _spec("ZhengPeng7/BiRefNet_HR", "swin_v1_l", 2048, "BiRefNet general trained at 2048x2048"),
        _spec("ZhengPeng7/BiRefNet_HR-matting", "swin_v1_l", 2048, "BiRefNet matting trained at 2048x2048"),
        _spec("ZhengPeng7/BiRefNet-matting", "swin_v1_l", 1024, "BiRefNet trimap-free matting (soft alpha)"),
        _spec("ZhengPeng7/BiRefNet-portrait", "swin_v1_l", 1024, "BiRefNet tuned for people (P3M-10k and humans)"),
        _spec("ZhengPeng7/BiRefNet_dynamic", "swin_v1_l", 1024, "BiRefNet trained on sizes from 256 to 2304",
              dynamic=True),
        _spec("ZhengPeng7/BiRefNet_512x512", "swin_v1_l", 512, "BiRefNet general trained at 512x512"),
    )
}

ALIASES: dict[str, str] = {
    "rmbg-2.0": "briaai/RMBG-2.0",
    "birefnet": "ZhengPeng7/BiRefNet",
    "birefnet-lite": "ZhengPeng7/BiRefNet_lite",
}

# Hub ids are matched case-insensitively because the hub itself resolves them that way.
_BY_KEY = {k.lower(): MODELS[v] for k, v in ALIASES.items()} | {k.lower(): v for k, v in MODELS.items()}


def lookup(name: str) -> ModelSpec | None:
    """The spec of a known hub id or alias (any case), else None."""
    return _BY_KEY.get(name.strip().lower())
