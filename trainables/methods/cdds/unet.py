"""CDDS's per-modality dual-path UNet (METHODS.md "CDDS" 1).

Known: a shared encoder of transformer layers feeds a *semantic* and a *modality* decoder with UNet
skips from each encoder level; z groups of Gaussian noise are added to the encoder output and the
decoded results averaged; 2 encoder levels and 2 levels per decoder at width 512 in the paper.
Reconstructed: the layer type (pre-norm transformer layers, feed-forward 2·d, no dropout), how a skip
enters a decoder level (concatenate, then a linear map back to d, as UNets concatenate skips), that
the skips themselves stay noise-free, and σ in units of each token's feature std.

Shapes: tokens [B, N, d] with a validity mask [B, N]; every level keeps [B, N, d] (decoder levels
[z, B, N, d] with z noise groups, averaged at the last level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FF_MULT = 2  # feed-forward width = FF_MULT * d (reconstructed; keeps the UNet near the backbone's cost)


def attention_keys(mask: Tensor) -> Tensor:
    """[B, N] validity -> [B, N] True = may be attended. A sample with no valid token attends to all
    of its (padding) tokens instead of producing NaN; its output is masked later."""
    return mask | ~mask.any(1, keepdim=True)


class PreNormLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer(d, heads, 2d, dropout 0, gelu, batch_first, norm_first)`` with
    the same parameters, initialisation and state-dict keys, and the same maths, but a forward that
    (1) calls fused attention (``scaled_dot_product_attention``) directly on any leading dims, with
    the boolean [B, N] key mask expanded over the z noise groups (no float mask merged per call, no
    head-split copies), and (2) can return the mean over a leading group dim with the second feed-forward map applied once
    to the mean (it and the residual are linear, so they commute with the mean).

    Pre-norm trains without warm-up. No dropout: the noise groups are CDDS's regulariser, and
    dropout would make the no-noise path stochastic as well.
    """

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads, dim_feedforward=FF_MULT * width, dropout=0.0, activation="gelu",
                         batch_first=True, norm_first=True)
        self.heads = heads

    def forward(self, x: Tensor, keys: Tensor, average_groups: bool = False) -> Tensor:
        """x [..., N, d], keys [..., N] bool (broadcastable to x's leading dims) -> [..., N, d], or
        with ``average_groups`` the mean over x's first dim: [z, ..., N, d] -> [..., N, d]."""
        x = x + self.attend(self.norm1(x), keys)
        hidden = F.gelu(self.linear1(self.norm2(x)))
        if average_groups:
            return x.mean(0) + self.linear2(hidden.mean(0))
        return x + self.linear2(hidden)

    def attend(self, h: Tensor, keys: Tensor) -> Tensor:
        """Multi-head self-attention of ``nn.MultiheadAttention`` (packed in-projection, out-projection).
        h [..., N, d], keys [..., N] -> [..., N, d]."""
        attn = self.self_attn
        lead, tokens = h.shape[:-2], h.shape[-2]
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).reshape(-1, tokens, 3, self.heads,
                                                                           h.shape[-1] // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [batch, heads, N, d / heads]
        allowed = keys.expand(*lead, tokens).reshape(-1, 1, 1, tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return attn.out_proj(out.transpose(1, 2).reshape(*lead, tokens, h.shape[-1]))


class DecoderLevel(nn.Module):
    """One decoder level: ``D_ℓ = layer(Linear([D_{ℓ−1}; H_skip]))``.

    previous [G, B, N, d] (G noise groups), skip [B, N, d], keys [B, N] -> [G, B, N, d], or
    [B, N, d] averaged over the groups (``average_groups``, the last level). The linear map on the
    concatenation is split into its two halves so the skip half, identical for every noise group, is
    computed once and broadcast instead of repeating the skip G times.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.from_previous = nn.Linear(width, width)
        self.from_skip = nn.Linear(width, width, bias=False)
        self.layer = PreNormLayer(width, heads)

    def forward(self, previous: Tensor, skip: Tensor, keys: Tensor, average_groups: bool = False) -> Tensor:
        fused = self.from_previous(previous) + self.from_skip(skip)
        return self.layer(fused, keys, average_groups)


class UNetDecoder(nn.Module):
    """``depth`` decoder levels; level ℓ (1-based) takes the previous output and skip ``H_{depth−ℓ}``;
    the last level also averages the noise groups."""

    def __init__(self, width: int, heads: int, depth: int):
        super().__init__()
        self.levels = nn.ModuleList(DecoderLevel(width, heads) for _ in range(depth))

    def forward(self, bottom: Tensor, skips: list[Tensor], keys: Tensor) -> Tensor:
        """bottom [G, B, N, d] (G = 1: H_depth; else G noisy copies of it); skips [H_{depth−1}, ...,
        H_0], one per level, each [B, N, d]; keys [B, N] (``attention_keys``) -> [B, N, d], the mean
        of the G decoded copies."""
        if len(skips) != len(self.levels):
            raise ValueError(f"{len(self.levels)} decoder levels need as many skips, got {len(skips)}")
        out = bottom
        for number, (level, skip) in enumerate(zip(self.levels, skips), start=1):
            out = level(out, skip, keys, average_groups=number == len(self.levels))
        return out


class DualPathUNet(nn.Module):
    """Shared encoder + semantic decoder (+ modality decoder when a loss reads it).

    ``forward(tokens [B, N, d], mask [B, N]) -> {"semantic": [B, N, d], "modality": [B, N, d]}``.
    In training with ``noise_std`` σ > 0, z = ``noise_groups`` noisy copies ``H_depth + σ s ε`` (s = each
    token's feature std, detached: σ is relative) are decoded in one pass (z as a leading dim) and
    averaged; in eval the decoders run once. Values at padding positions are unspecified.
    """

    def __init__(self, width: int, heads: int, depth: int, noise_groups: int = 1, noise_std: float = 0.0,
                 modality_path: bool = True):
        super().__init__()
        self.noise_groups, self.noise_std = noise_groups, noise_std
        self.encoder = nn.ModuleList(PreNormLayer(width, heads) for _ in range(depth))
        self.semantic = UNetDecoder(width, heads, depth)
        self.modality = UNetDecoder(width, heads, depth) if modality_path else None

    def encode(self, tokens: Tensor, keys: Tensor) -> list[Tensor]:
        """[B, N, d], keys [B, N] -> [H_0 = tokens, H_1, ..., H_depth], each [B, N, d]."""
        levels = [tokens]
        for layer in self.encoder:
            levels.append(layer(levels[-1], keys))
        return levels

    def uses_noise(self) -> bool:
        return self.training and self.noise_std > 0

    def add_noise(self, bottom: Tensor) -> Tensor:
        """z noisy copies of the encoder output: [B, N, d] -> [z, B, N, d]; the skips and the key
        mask stay [B, N, ...] and broadcast over z (see ``DecoderLevel``).

        σ is relative: each token's noise has std ``noise_std · std_d(H_D[b, n])`` (that token's std
        over its d features, detached), so the signal-to-noise ratio does not depend on the scale
        the encoder happens to reach, and the noise is per-sample.
        """
        z = self.noise_groups
        scale = self.noise_std * bottom.detach().std(-1, unbiased=False, keepdim=True)  # [B, N, 1]
        noise = torch.randn((z, *bottom.shape), device=bottom.device, dtype=bottom.dtype) * scale
        return bottom.unsqueeze(0) + noise

    def forward(self, tokens: Tensor, mask: Tensor) -> dict[str, Tensor]:
        keys = attention_keys(mask)
        levels = self.encode(tokens, keys)
        bottom, skips = levels[-1], levels[-2::-1]  # skips: H_{depth-1}, ..., H_0
        bottom = self.add_noise(bottom) if self.uses_noise() else bottom.unsqueeze(0)
        decoders = {"semantic": self.semantic, "modality": self.modality}
        return {name: decoder(bottom, skips, keys) for name, decoder in decoders.items()
                if decoder is not None}
