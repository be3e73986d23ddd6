"""BiRefNet in the configuration of BRIA RMBG-2.0 and the public BiRefNet "general" checkpoints.

Multi-scale input by concatenation (the backbone also sees the image at half size), three
context skips into the deepest feature, a squeeze block, a decoder with ASPP-deformable
attention, image patches fed to every decoder level, side outputs at 1/32, 1/16 and 1/8,
and gradient-attention gates. Parameter names equal the reference checkpoints' keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BasicDecBlk, BasicLatBlk, SimpleConvs, gradient_gate, head
from .swin import SWIN_CONFIGS, SwinTransformer

BACKBONES = tuple(SWIN_CONFIGS)


def resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def image_patches(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Cut the image into (H/h)*(W/w) tiles of h x w and stack them on channels, column by column."""
    B, C, H, W = x.shape
    nh, nw = H // h, W // w
    return x.view(B, C, nh, h, nw, w).permute(0, 4, 2, 1, 3, 5).reshape(B, nw * nh * C, h, w)


class Decoder(nn.Module):
    def __init__(self, ch: list[int]):
        super().__init__()
        c0, c1, c2, c3 = ch
        # Image patches enter each level: 32x32 tiles at 1/32, 16x16 at 1/16, ..., the image itself at 1/1.
        self.ipt_blk5 = SimpleConvs(3 * 32 * 32, c0 // 8)
        self.ipt_blk4 = SimpleConvs(3 * 16 * 16, c0 // 8)
        self.ipt_blk3 = SimpleConvs(3 * 8 * 8, c1 // 8)
        self.ipt_blk2 = SimpleConvs(3 * 4 * 4, c2 // 8)
        self.ipt_blk1 = SimpleConvs(3, c3 // 8)
        self.decoder_block4 = BasicDecBlk(c0 + c0 // 8, c1)
        self.decoder_block3 = BasicDecBlk(c1 + c0 // 8, c2)
        self.decoder_block2 = BasicDecBlk(c2 + c1 // 8, c3)
        self.decoder_block1 = BasicDecBlk(c3 + c2 // 8, c3 // 2)
        self.conv_out1 = head(c3 // 2 + c3 // 8)
        self.lateral_block4 = BasicLatBlk(c1, c1)
        self.lateral_block3 = BasicLatBlk(c2, c2)
        self.lateral_block2 = BasicLatBlk(c3, c3)
        self.conv_ms_spvn_4 = nn.Conv2d(c1, 1, 1)
        self.conv_ms_spvn_3 = nn.Conv2d(c2, 1, 1)
        self.conv_ms_spvn_2 = nn.Conv2d(c3, 1, 1)
        self.gdt_convs_4 = gradient_gate(c1)
        self.gdt_convs_3 = gradient_gate(c2)
        self.gdt_convs_2 = gradient_gate(c3)
        # Gradient predictions only supervise training; kept so checkpoints load strictly.
        self.gdt_convs_pred_4 = head(16)
        self.gdt_convs_pred_3 = head(16)
        self.gdt_convs_pred_2 = head(16)
        self.gdt_convs_attn_4 = head(16)
        self.gdt_convs_attn_3 = head(16)
        self.gdt_convs_attn_2 = head(16)

    def with_patches(self, p: torch.Tensor, x: torch.Tensor, blk: nn.Module) -> torch.Tensor:
        return torch.cat([p, blk(image_patches(x, *p.shape[2:]))], 1)

    def forward(self, x: torch.Tensor, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        x1, x2, x3, p = feats
        sides = []
        for level, skip in ((4, x3), (3, x2), (2, x1)):
            p = self.with_patches(p, x, getattr(self, f"ipt_blk{level + 1}"))
            p = getattr(self, f"decoder_block{level}")(p)
            sides.append(getattr(self, f"conv_ms_spvn_{level}")(p))
            gate = getattr(self, f"gdt_convs_attn_{level}")(getattr(self, f"gdt_convs_{level}")(p))
            p = p * gate.sigmoid()
            p = resize(p, skip.shape[2:]) + getattr(self, f"lateral_block{level}")(skip)
        p = self.decoder_block1(self.with_patches(p, x, self.ipt_blk2))
        p = self.with_patches(resize(p, x.shape[2:]), x, self.ipt_blk1)
        sides.append(self.conv_out1(p))
        return sides


class BiRefNet(nn.Module):
    """forward(x) -> [side 1/32, side 1/16, side 1/8, logits at input size]; mask = sigmoid(last)."""

    def __init__(self, backbone: str = "swin_v1_l"):
        super().__init__()
        if backbone not in SWIN_CONFIGS:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
        self.backbone = backbone
        self.bb = SwinTransformer(SWIN_CONFIGS[backbone])
        # Stage channels deepest first, doubled by the multi-scale concatenation.
        ch = [2 * c for c in reversed(self.bb.channels)]
        self.squeeze_module = nn.Sequential(BasicDecBlk(ch[0] + sum(ch[1:]), ch[0]))
        self.decoder = Decoder(ch)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        H, W = x.shape[2:]
        full = self.bb(x)
        half = self.bb(F.interpolate(x, size=(H // 2, W // 2), mode="bilinear", align_corners=True))
        x1, x2, x3, x4 = (torch.cat([f, resize(g, f.shape[2:])], 1) for f, g in zip(full, half))
        size = x4.shape[2:]
        x4 = torch.cat([resize(x1, size), resize(x2, size), resize(x3, size), x4], 1)
        return [x1, x2, x3, x4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        H, W = x.shape[2:]
        if H % 32 or W % 32:
            raise ValueError(f"BiRefNet input sides must be multiples of 32, got {H}x{W}")
        x1, x2, x3, x4 = self.encode(x)
        return self.decoder(x, [x1, x2, x3, self.squeeze_module(x4)])
