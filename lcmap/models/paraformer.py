"""Paraformer (L2HNet v2, CVPR 2024): a downsampling-free CNN branch plus a ViT branch, two heads.

Written from the architecture description in ``notes/paraformer.md`` (not from the authors' code).

Data flow for an input of ``B x C x H x W`` (``H``, ``W`` multiples of 16 px; ``w`` = CNN width):

* **CNN branch** (full resolution): a 3x3 stem conv (``C -> w``) and 5 resolution-preserving
  multi-kernel blocks. The 5 block outputs are concatenated (``5w`` channels, ``H x W``) and reduced by
  weight-standardised convs with GroupNorm + ReLU to ``10w`` ch at 1/2, ``16w`` ch at 1/4 and ``16w``
  ch at 1/16 of the input size.
* **Transformer branch**: a 1x1 conv maps the 1/16 features to tokens of the ViT hidden size
  (one token per 16 x 16 px cell, no CLS token), adds learned position embeddings (stored for a
  14 x 14 base grid, resized bicubically to the input's grid), then ViT encoder blocks and a final
  LayerNorm.
* **Decoder**: tokens -> 1/16 map -> fused with the 1/16, 1/4 and 1/2 CNN features while
  upsampling; then head 1 ("CNN head", fused with the full-resolution CNN features) and head 2
  ("Transformer head"), both giving class logits at the input resolution.

``forward`` returns ``[head1_logits, head2_logits]``, each ``(B, K, H, W)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import StdConv2d
from timm.models.vision_transformer import Block
from torch import Tensor, nn

log = logging.getLogger(__name__)

PATCH = 16
"""Total downsampling of the CNN branch, i.e. the pixel size of one ViT token (px)."""


@dataclass(frozen=True)
class ParaformerConfig:
    """Hyper-parameters of a Paraformer.

    Attributes:
        cnn_width: channels ``w`` of the full-resolution CNN branch.
        cnn_blocks: resolution-preserving multi-kernel blocks (5 in the paper; they dominate the
            CPU cost of small models).
        down_channels: channels of the weight-standardised downsampling convs at 1/2, 1/4 and 1/16
            of the input size; ``None`` means ``(10w, 16w, 16w)`` (640, 1024, 1024 at ``w`` = 64).
        hidden_size: ViT token width ``D``.
        num_layers: number of ViT encoder blocks.
        num_heads: attention heads per block (must divide ``hidden_size``).
        mlp_dim: hidden width of each block's MLP.
        dropout: dropout rate after the position embeddings and inside the blocks (MLP, projection).
        attention_dropout: dropout rate on the attention weights.
        decoder_channels: widths of the decoder convs: the 1/16 convs (512 in the paper), the 1/4
            conv (640) and head 2's conv (256).
        base_grid: side (tokens) of the grid the position embeddings are stored for
            (224 px / 16 px = 14); resized bicubically to other input sizes.
    """

    cnn_width: int = 64
    cnn_blocks: int = 5
    down_channels: tuple[int, int, int] | None = None
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.0
    decoder_channels: tuple[int, int, int] = (512, 640, 256)
    base_grid: int = 14

    @property
    def downsample_channels(self) -> tuple[int, int, int]:
        """Channels at 1/2, 1/4 and 1/16 resolution."""
        if self.down_channels is not None:
            return self.down_channels
        w = self.cnn_width
        return (10 * w, 16 * w, 16 * w)


CONFIGS: dict[str, ParaformerConfig] = {
    # The paper's configuration: CNN width 64, ViT-B/16 encoder. ~143 M parameters.
    "paraformer": ParaformerConfig(),
    # CPU-sized (~2.8 M parameters): CNN width 16 with a slimmer pyramid (4w, 8w, 8w instead of
    # 10w, 16w, 16w), a 4-block ViT-Ti-wide encoder (192 wide, 3 heads) and the decoder / 8 (same
    # 512:640:256 proportions). Most of its CPU time is the 5 full-resolution blocks, whose cost
    # barely drops below width 16 (memory-bound small-channel convs).
    "paraformer-tiny": ParaformerConfig(
        cnn_width=16,
        down_channels=(64, 128, 128),
        hidden_size=192,
        num_layers=4,
        num_heads=3,
        mlp_dim=768,
        dropout=0.1,
        decoder_channels=(64, 80, 32),
    ),
}


def _groups(channels: int, max_groups: int = 32) -> int:
    """Largest number of GroupNorm groups <= ``max_groups`` that divides ``channels``."""
    return math.gcd(channels, max_groups)


class ConvBNReLU(nn.Sequential):
    """``k x k`` conv (stride 1, same padding, no bias) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class StdConvGNReLU(nn.Sequential):
    """Weight-standardised strided conv -> GroupNorm -> ReLU (downsamples by ``stride``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__(
            StdConv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                bias=False,
            ),
            nn.GroupNorm(_groups(out_channels), out_channels, eps=1e-6),
            nn.ReLU(inplace=True),
        )


class MultiKernelBlock(nn.Module):
    """Resolution-preserving block of the CNN branch.

    Three parallel conv-BN-ReLU paths (kernels 1, 3, 5 -> ``w``, ``w/2``, ``w/4`` channels) are
    concatenated (``1.75 w``), fused back to ``w`` by a 1x1 conv-BN-ReLU and added to the input.

    Args:
        width: channels ``w`` in and out.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        c1, c3, c5 = width, max(width // 2, 1), max(width // 4, 1)
        self.path1 = ConvBNReLU(width, c1, 1)
        self.path3 = ConvBNReLU(width, c3, 3)
        self.path5 = ConvBNReLU(width, c5, 5)
        self.fuse = ConvBNReLU(c1 + c3 + c5, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, w, H, W)`` -> ``(B, w, H, W)``."""
        y = torch.cat([self.path1(x), self.path3(x), self.path5(x)], dim=1)
        return x + self.fuse(y)


class CNNBranch(nn.Module):
    """Downsampling-free CNN branch and its weight-standardised downsampling pyramid.

    Args:
        in_channels: image bands ``C``.
        width: channels ``w`` at full resolution.
        down_channels: channels at 1/2, 1/4 and 1/16 resolution.
        num_blocks: number of multi-kernel blocks (5 in the paper).
    """

    def __init__(self, in_channels: int, width: int, down_channels: tuple[int, int, int], num_blocks: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.ModuleList(MultiKernelBlock(width) for _ in range(num_blocks))
        d2, d4, d16 = down_channels
        self.down2 = StdConvGNReLU(num_blocks * width, d2, 3, 2)
        self.down4 = StdConvGNReLU(d2, d4, 3, 2)
        self.down16 = StdConvGNReLU(d4, d16, 5, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Features of ``x`` ``(B, C, H, W)``.

        Returns:
            ``(full, half, quarter, sixteenth)``: ``(B, w, H, W)`` (last block's output),
            ``(B, d2, H/2, W/2)``, ``(B, d4, H/4, W/4)`` and ``(B, d16, H/16, W/16)``.
        """
        x = self.stem(x)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        half = self.down2(torch.cat(outs, dim=1))
        quarter = self.down4(half)
        sixteenth = self.down16(quarter)
        return x, half, quarter, sixteenth


class TransformerBranch(nn.Module):
    """ViT encoder over tokens made from the 1/16 CNN features (no CLS token).

    Parameter names mirror timm's ``VisionTransformer`` (``pos_embed``, ``blocks.N.*``, ``norm.*``)
    so pretrained weights map one-to-one (see :mod:`lcmap.models.vit_weights`).

    Args:
        in_channels: channels of the 1/16 CNN features.
        cfg: model configuration (hidden size, depth, heads, MLP width, dropout, base grid).
    """

    def __init__(self, in_channels: int, cfg: ParaformerConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"ViT hidden size {cfg.hidden_size} is not divisible by {cfg.num_heads} heads")
        self.base_grid = cfg.base_grid
        self.hidden_size = cfg.hidden_size
        self.token_proj = nn.Conv2d(in_channels, cfg.hidden_size, 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.base_grid**2, cfg.hidden_size))
        self.pos_drop = nn.Dropout(cfg.dropout)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(
                dim=cfg.hidden_size,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_dim / cfg.hidden_size,
                qkv_bias=True,
                proj_drop=cfg.dropout,
                attn_drop=cfg.attention_dropout,
                norm_layer=norm_layer,  # type: ignore[arg-type]  # timm calls it; a partial is fine
            )
            for _ in range(cfg.num_layers)
        )
        self.norm = norm_layer(cfg.hidden_size)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def position_embeddings(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings ``(1, grid_h * grid_w, D)`` for a ``grid_h x grid_w`` token grid."""
        g = self.base_grid
        if (grid_h, grid_w) == (g, g):
            return self.pos_embed
        pe = self.pos_embed.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return pe.flatten(2).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """1/16 features ``(B, d16, h, w)`` -> encoded tokens as a map ``(B, D, h, w)``."""
        t = self.token_proj(x)
        b, d, h, w = t.shape
        t = t.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major over the grid
        t = self.pos_drop(t + self.position_embeddings(h, w))
        for block in self.blocks:
            t = block(t)
        t = self.norm(t)
        return t.transpose(1, 2).reshape(b, d, h, w)


def _up(x: Tensor, factor: int) -> Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class Decoder(nn.Module):
    """Fuses the ViT tokens with the CNN pyramid; two full-resolution heads.

    Args:
        width: CNN width ``w`` (channels of the full-resolution features).
        down_channels: CNN channels at 1/2, 1/4, 1/16.
        hidden_size: ViT token width ``D``.
        decoder_channels: widths of the 1/16 convs, the 1/4 conv and head 2's conv.
        num_classes: output classes ``K``.
    """

    def __init__(
        self,
        width: int,
        down_channels: tuple[int, int, int],
        hidden_size: int,
        decoder_channels: tuple[int, int, int],
        num_classes: int,
    ) -> None:
        super().__init__()
        d2, d4, d16 = down_channels
        c16, c4, c_head2 = decoder_channels
        self.from_tokens = ConvBNReLU(hidden_size, c16, 3)  # 1/16
        self.fuse16 = ConvBNReLU(c16 + d16, c16, 3)  # 1/16, then up x4
        self.fuse4 = ConvBNReLU(c16 + d4, c4, 3)  # 1/4, then up x2
        fused2 = c4 + d2  # 1/2
        # Head 1 (CNN head): 1 channel at 1/2 -> up x2 -> with full-res CNN features -> classes.
        self.head1_reduce = ConvBNReLU(fused2, 1, 3)
        self.head1_out = nn.Conv2d(width + 1, num_classes, 3, padding=1)
        # Head 2 (Transformer head): conv at 1/2 -> up x2 -> classes.
        self.head2_reduce = ConvBNReLU(fused2, c_head2, 3)
        self.head2_out = nn.Conv2d(c_head2, num_classes, 3, padding=1)

    def forward(self, tokens: Tensor, full: Tensor, half: Tensor, quarter: Tensor, sixteenth: Tensor) -> list[Tensor]:
        """Token map ``(B, D, H/16, W/16)`` and CNN features -> ``[head1, head2]`` ``(B, K, H, W)``."""
        x = self.from_tokens(tokens)
        x = self.fuse16(torch.cat([x, sixteenth], dim=1))
        x = self.fuse4(torch.cat([_up(x, 4), quarter], dim=1))
        x = torch.cat([_up(x, 2), half], dim=1)
        h1 = _up(self.head1_reduce(x), 2)
        h1 = self.head1_out(torch.cat([h1, full], dim=1))
        h2 = self.head2_out(_up(self.head2_reduce(x), 2))
        return [h1, h2]


class Paraformer(nn.Module):
    """Paraformer: CNN + ViT hybrid with a CNN head and a Transformer head.

    Args:
        in_channels: image bands ``C`` (any number >= 1).
        num_classes: output classes ``K``.
        cfg: size configuration (see :data:`CONFIGS`).

    Input height and width must be multiples of 16 px.
    """

    def __init__(self, in_channels: int, num_classes: int, cfg: ParaformerConfig) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"Paraformer needs >= 1 band and >= 1 class, got {in_channels} and {num_classes}")
        self.cfg = cfg
        self.in_channels = in_channels
        self.num_classes = num_classes
        down = cfg.downsample_channels
        self.cnn = CNNBranch(in_channels, cfg.cnn_width, down, num_blocks=cfg.cnn_blocks)
        self.vit = TransformerBranch(down[2], cfg)
        self.decoder = Decoder(cfg.cnn_width, down, cfg.hidden_size, cfg.decoder_channels, num_classes)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of both heads for images ``x`` ``(B, C, H, W)``.

        Returns:
            ``[head1, head2]``: CNN-head and Transformer-head logits, each ``(B, K, H, W)``.

        Raises:
            ValueError: if ``H`` or ``W`` is not a multiple of 16 px, or ``C`` is not the model's
                band count.
        """
        if x.ndim != 4:
            raise ValueError(f"Paraformer expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"Paraformer was built for {self.in_channels} bands, got {c}")
        if h % PATCH or w % PATCH:
            raise ValueError(f"Paraformer input size {h}x{w} px is not a multiple of {PATCH} px in height and width")
        full, half, quarter, sixteenth = self.cnn(x)
        tokens = self.vit(sixteenth)
        return self.decoder(tokens, full, half, quarter, sixteenth)

    def branch_parameters(self) -> dict[str, int]:
        """Parameter counts: ``cnn``, ``vit`` (incl. token projection), ``decoder`` and ``total``."""
        counts = {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in ("cnn", "vit", "decoder")}
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts


def build_paraformer(
    name: str,
    in_channels: int,
    num_classes: int,
    vit_weights: str | Path | None = None,
    **overrides: Any,
) -> Paraformer:
    """Build a Paraformer by size name, optionally loading pretrained ViT weights.

    Args:
        name: ``paraformer`` (paper size, ~143 M parameters) or ``paraformer-tiny`` (CPU size).
        in_channels: image bands.
        num_classes: output classes.
        vit_weights: optional LOCAL file with pretrained ViT encoder weights (timm ``.pth`` /
            ``.pt`` / ``.bin``, ``.safetensors`` or Google ``.npz``); nothing is downloaded.
        **overrides: fields of :class:`ParaformerConfig` to change (e.g. ``dropout=0.0``).

    Raises:
        ValueError: unknown name.
        lcmap.errors.LcmapInputError: unreadable or mismatching weights file.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown Paraformer size {name!r}: choose one of {', '.join(CONFIGS)}")
    cfg = replace(CONFIGS[name], **overrides) if overrides else CONFIGS[name]
    model = Paraformer(in_channels, num_classes, cfg)
    if vit_weights is not None:
        from lcmap.models.vit_weights import load_vit_weights

        info = load_vit_weights(model, vit_weights)
        log.info(
            "loaded ViT weights from %s: %d tensors loaded, %d skipped, %d missing",
            vit_weights,
            info["loaded"],
            info["skipped"],
            info["missing"],
        )
    return model


__all__ = ["CONFIGS", "PATCH", "Paraformer", "ParaformerConfig", "build_paraformer"]
