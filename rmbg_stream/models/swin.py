"""Swin Transformer v1 backbone, laid out as BiRefNet's (detection-style) variant.

Differences from the classification Swin matter for checkpoint compatibility and numbers:
feature maps are padded up to a multiple of the window instead of shrinking the window,
every stage is returned after its own LayerNorm (``norm0``..``norm3``), and the stage
output is taken *before* patch merging.

Half precision (tests/test_half_precision.py): the whole network runs in fp16 and bf16 with no inf or NaN
in any module. No step is forced to fp32 here: LayerNorm, softmax attention (SDPA) and BatchNorm
accumulate in fp32 inside PyTorch's kernels, the attention bias and the -100 shift mask fit fp16, and the
largest activation measured is about 28. The one fp32 step is the deformable convolution in bf16
(``blocks.DeformableConv2d``: torchvision has no bf16 kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SwinConfig:
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


SWIN_CONFIGS = {
    "swin_v1_t": SwinConfig(96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_v1_s": SwinConfig(96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin_v1_b": SwinConfig(128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin_v1_l": SwinConfig(192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}


def relative_position_index(ws: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, ws*ws, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // ws) * (W // ws), ws * ws, C)


def window_reverse(x: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """(B, nW, ws*ws, C) -> (B, H, W, C)."""
    B, _, _, C = x.shape
    x = x.view(B, H // ws, W // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def shift_mask(Hp: int, Wp: int, ws: int, shift: int, device) -> torch.Tensor:
    """Additive mask (nW, N, N) that keeps shifted windows from attending across regions."""
    img = torch.zeros(1, Hp, Wp, 1, device=device)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    label = 0
    for h in cuts:
        for w in cuts:
            img[:, h, w, :] = label
            label += 1
    win = window_partition(img, ws).view(-1, ws * ws)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def additive_mask(self, nW: int, shift: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The relative-position bias, plus `shift` (nW, N, N) when given, as SDPA's additive mask (nW*h, N, N) in
        `dtype`. Windows and heads share one axis so it broadcasts over the batch without a copy per image."""
        h = self.num_heads
        N = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, h).permute(2, 0, 1)
        if shift is not None:
            bias = (shift[:, None] + bias[None]).reshape(nW * h, N, N)
        else:
            bias = bias.repeat(nW, 1, 1)
        return bias.to(dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, nW, N, C); mask: `additive_mask`'s (nW*h, N, N)."""
        B, nW, N, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(B, nW, N, 3, h, C // h).permute(3, 0, 1, 4, 2, 5)
        q, k, v = (t.reshape(B, nW * h, N, C // h) for t in qkv.unbind(0))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype)[None])
        out = out.view(B, nW, h, N, C // h).transpose(2, 3).reshape(B, nW, N, C)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int):
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 4)

    def forward(self, x: torch.Tensor, H: int, W: int, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, H*W, C); mask: this block's `WindowAttention.additive_mask` at the padded size."""
        B, _, C = x.shape
        ws, s = self.window_size, self.shift
        # Pad after the norm: padded tokens are zeros and take part in attention, as in the reference.
        y = F.pad(self.norm1(x).view(B, H, W, C), (0, 0, 0, (-W) % ws, 0, (-H) % ws))
        Hp, Wp = y.shape[1:3]
        if s:
            y = torch.roll(y, (-s, -s), (1, 2))
        y = self.attn(window_partition(y, ws), mask)
        y = window_reverse(y, ws, Hp, Wp)
        if s:
            y = torch.roll(y, (s, s), (1, 2))
        x = x + y[:, :H, :W].reshape(B, H * W, C)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, _, C = x.shape
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class SwinStage(nn.Module):
    # Padded sizes whose attention masks stay cached. BiRefNet runs the backbone at its input size and at half of
    # it, so a resolution takes two; four hold two resolutions (a dynamic model's: one per aspect). Swin-L at
    # 1024x1024 keeps about 1.3 GB of masks in fp16 over both sizes and four stages (2.6 GB in fp32).
    MAX_CACHED = 4
    # Cached on CUDA only. There rebuilding is pure memory traffic (about 4 GB per Swin-L frame at 1024x1024) on a
    # card with room to spare. On the CPU the masks would hold 2.6 GB of RAM (fp32 Swin-L at 1024) to save about 5 %
    # of a forward (2.1 s of ~40 s; Swin-T at 512 moved by 1.006x).
    CACHE_DEVICES = ("cuda",)

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, downsample: bool):
        super().__init__()
        self.window_size = window_size
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else window_size // 2) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None
        # (Hp, Wp, dtype, device) -> (stamp of the bias tables, the tables, one mask per block); a plain attribute, so
        # never in the state dict. See `masks`.
        self._masks: dict[tuple, tuple[tuple, list[torch.Tensor], list[torch.Tensor]]] = {}

    def build_masks(self, Hp: int, Wp: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        """Each block's additive attention mask (nW*h, N, N) in `dtype` for a feature map padded to Hp x Wp."""
        ws = self.window_size
        nW = (Hp // ws) * (Wp // ws)
        shift = shift_mask(Hp, Wp, ws, ws // 2, device)
        return [blk.attn.additive_mask(nW, shift if blk.shift else None, dtype) for blk in self.blocks]

    def masks(self, Hp: int, Wp: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
        """`build_masks`, cached: rebuilt in every block of every forward they cost Swin-L about 4 GB of memory
        traffic per 1024x1024 frame; building them took 2.1 s of each Swin-L 1024x1024 forward on one CPU thread
        (41 ms of Swin-T's 2.8 s at 512x512, where eager CPU speed moved by 1.006x). An entry holds only while the
        bias tables have the storage and version counter it was built from, so loaded weights, `.to()`, `.half()`
        or any in-place edit miss it (the entry keeps its tables alive, so their address cannot be reused by new
        ones; `load_state_dict` also clears the cache, for inference tensors, which have no version counter).
        Bypassed while autograd records (a cached mask would share one graph between forwards) and while
        torch.compile, torch.export or the ONNX exporter trace: they see the computation, not a constant."""
        tracing = torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if tracing or torch.is_grad_enabled() or torch.device(device).type not in self.CACHE_DEVICES:
            return self.build_masks(Hp, Wp, dtype, device)
        key = (Hp, Wp, dtype, torch.device(device))
        tables = [blk.attn.relative_position_bias_table for blk in self.blocks]
        stamp = tuple((t.data_ptr(), t.dtype, t.device, 0 if t.is_inference() else t._version) for t in tables)
        hit = self._masks.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[2]
        masks = self.build_masks(Hp, Wp, dtype, device)
        self._masks.pop(key, None)
        while len(self._masks) >= self.MAX_CACHED:
            self._masks.pop(next(iter(self._masks)))
        self._masks[key] = (stamp, [t.detach() for t in tables], masks)
        return masks

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._masks.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor, H: int, W: int):
        ws = self.window_size
        masks = self.masks(-(-H // ws) * ws, -(-W // ws) * ws, x.dtype, x.device)
        for blk, mask in zip(self.blocks, masks):
            x = blk(x, H, W, mask)
        down = self.downsample(x, H, W) if self.downsample is not None else None
        return x, down


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int = 4):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor):
        p = self.patch
        x = self.proj(F.pad(x, (0, (-x.shape[3]) % p, 0, (-x.shape[2]) % p)))
        H, W = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class SwinTransformer(nn.Module):
    """Returns the four stage features as (B, C_i, H/4/2^i, W/4/2^i)."""

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.channels = cfg.channels
        self.patch_embed = PatchEmbed(cfg.embed_dim)
        n = len(cfg.depths)
        self.layers = nn.ModuleList(
            SwinStage(self.channels[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size, i < n - 1) for i in range(n)
        )
        for i, c in enumerate(self.channels):
            self.add_module(f"norm{i}", nn.LayerNorm(c))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        B = x.shape[0]
        x, H, W = self.patch_embed(x)
        outs = []
        for i, layer in enumerate(self.layers):
            feat, x = layer(x, H, W)
            feat = getattr(self, f"norm{i}")(feat)
            outs.append(feat.view(B, H, W, -1).permute(0, 3, 1, 2).contiguous())
            H, W = (H + 1) // 2, (W + 1) // 2
        return outs
