"""CDDS's per-modality dual-path UNet (METHODS.md "CDDS" 1).

Known: a shared encoder of transformer layers feeds a *semantic* and a *modality* decoder with UNet
skips from each encoder level; z groups of Gaussian noise are added to the encoder output and the
decoded results averaged; 2 encoder levels and 2 levels per decoder at width 512 in the paper.
Reconstructed: the layer type (pre-norm transformer layers, feed-forward 2·d, no dropout), how a skip
enters a decoder level (concatenate, then a linear map back to d, as UNets concatenate skips), that
the skips themselves stay noise-free, and σ in units of each token's feature std.

Shapes: tokens [B, N, d] with a validity mask [B, N]; every level keeps [B, N, d].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FF_MULT = 2  # feed-forward width = FF_MULT * d (reconstructed; keeps the UNet near the backbone's cost)


def transformer_layer(width: int, heads: int) -> nn.TransformerEncoderLayer:
    # Pre-norm trains without warm-up. No dropout: the noise groups are CDDS's regulariser, and
    # dropout would make the no-noise path stochastic as well.
    return nn.TransformerEncoderLayer(width, heads, dim_feedforward=FF_MULT * width, dropout=0.0,
                                      activation="gelu", batch_first=True, norm_first=True)


def key_padding(mask: Tensor) -> Tensor:
    """[B, N] validity -> [B, N] True = ignore as attention key. A sample with no valid token
    attends to all of its (padding) tokens instead of producing NaN; its output is masked later."""
    return ~mask & mask.any(1, keepdim=True)


class DecoderLevel(nn.Module):
    """One decoder level: ``D_ℓ = layer(Linear([D_{ℓ−1}; H_skip]))``.

    previous [G·B, N, d] (G noise groups, group-major), skip [B, N, d], padding [G·B, N] -> [G·B, N, d].
    The linear map on the concatenation is split into its two halves so the skip half, identical
    for every noise group, is computed once and broadcast instead of repeating the skip G times.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.from_previous = nn.Linear(width, width)
        self.from_skip = nn.Linear(width, width, bias=False)
        self.layer = transformer_layer(width, heads)

    def forward(self, previous: Tensor, skip: Tensor, padding: Tensor) -> Tensor:
        groups = previous.shape[0] // skip.shape[0]
        fused = self.from_previous(previous).unflatten(0, (groups, skip.shape[0])) + self.from_skip(skip)
        return self.layer(fused.flatten(0, 1), src_key_padding_mask=padding)


class UNetDecoder(nn.Module):
    """``depth`` decoder levels; level ℓ (1-based) takes the previous output and skip ``H_{depth−ℓ}``."""

    def __init__(self, width: int, heads: int, depth: int):
        super().__init__()
        self.levels = nn.ModuleList(DecoderLevel(width, heads) for _ in range(depth))

    def forward(self, bottom: Tensor, skips: list[Tensor], padding: Tensor) -> Tensor:
        """bottom [G·B, N, d] (H_depth, or G noisy copies of it); skips [H_{depth−1}, ..., H_0], one
        per level, each [B, N, d]; padding [G·B, N] -> [G·B, N, d]."""
        out = bottom
        for level, skip in zip(self.levels, skips, strict=True):
            out = level(out, skip, padding)
        return out


class DualPathUNet(nn.Module):
    """Shared encoder + semantic decoder (+ modality decoder when a loss reads it).

    ``forward(tokens [B, N, d], mask [B, N]) -> {"semantic": [B, N, d], "modality": [B, N, d]}``.
    In training with ``noise_std`` σ > 0, z = ``noise_groups`` noisy copies ``H_depth + σ s ε`` (s = each
    token's feature std, detached: σ is relative) are decoded in one pass (z folded into the batch
    dim) and averaged; in eval the decoders run once.
    """

    def __init__(self, width: int, heads: int, depth: int, noise_groups: int = 1, noise_std: float = 0.0,
                 modality_path: bool = True):
        super().__init__()
        self.noise_groups, self.noise_std = noise_groups, noise_std
        self.encoder = nn.ModuleList(transformer_layer(width, heads) for _ in range(depth))
        self.semantic = UNetDecoder(width, heads, depth)
        self.modality = UNetDecoder(width, heads, depth) if modality_path else None

    def encode(self, tokens: Tensor, padding: Tensor) -> list[Tensor]:
        """[B, N, d] -> [H_0 = tokens, H_1, ..., H_depth], each [B, N, d]."""
        levels = [tokens]
        for layer in self.encoder:
            levels.append(layer(levels[-1], src_key_padding_mask=padding))
        return levels

    def uses_noise(self) -> bool:
        return self.training and self.noise_std > 0

    def add_noise(self, bottom: Tensor, padding: Tensor) -> tuple[Tensor, Tensor]:
        """Fold z noisy copies of the encoder output into the batch: [B, N, d] -> [z·B, N, d]
        (group-major) and the padding with it; the skips stay [B, N, d] (see ``DecoderLevel``).

        σ is relative: each token's noise has std ``noise_std · std_d(H_D[b, n])`` (that token's std
        over its d features, detached), so the signal-to-noise ratio does not depend on the scale
        the encoder happens to reach, and the noise is per-sample (the same under DDP).
        """
        z = self.noise_groups
        scale = self.noise_std * bottom.detach().std(-1, unbiased=False, keepdim=True)  # [B, N, 1]
        noise = torch.randn((z, *bottom.shape), device=bottom.device, dtype=bottom.dtype) * scale
        return (bottom.unsqueeze(0) + noise).flatten(0, 1), padding.repeat(z, 1)

    def forward(self, tokens: Tensor, mask: Tensor) -> dict[str, Tensor]:
        padding = key_padding(mask)
        levels = self.encode(tokens, padding)
        bottom, skips = levels[-1], levels[-2::-1]  # skips: H_{depth-1}, ..., H_0
        groups = 1
        if self.uses_noise():
            groups = self.noise_groups
            bottom, padding = self.add_noise(bottom, padding)
        decoders = {"semantic": self.semantic, "modality": self.modality}
        out = {}
        for name, decoder in decoders.items():
            if decoder is not None:
                decoded = decoder(bottom, skips, padding)
                out[name] = decoded.unflatten(0, (groups, tokens.shape[0])).mean(0)  # average over z
        return out
