"""Pool token embeddings [B, N, d] with a validity mask [B, N] into one vector per sample [B, d].

Pooling runs in float32 with autocast off (``trainables/precision.py``), whatever the encoders ran
in: its outputs are the retrieval embeddings, and GPO's GRU would otherwise run in fp16 under CUDA
autocast. Nothing here reads a tensor on the host: shapes depend only on the input's shapes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from trainables.errors import ConfigError
from trainables.precision import full_precision, upcast


class Pooling(nn.Module):
    """Base class: ``forward`` = ``pool`` on float32 tokens with autocast off."""

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        with full_precision(tokens.device):
            return self.pool(upcast(tokens), mask)

    def pool(self, tokens: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError


class MeanPool(Pooling):
    def pool(self, tokens: Tensor, mask: Tensor) -> Tensor:
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class MaxPool(Pooling):
    def pool(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return tokens.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)


def positional_encoding(length: int, dim: int, device: torch.device, dtype=torch.float32) -> Tensor:
    """Sinusoidal encodings [length, dim] of the sorted-rank positions GPO weights."""
    position = torch.arange(length, device=device, dtype=dtype).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=dtype) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device, dtype=dtype)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)
    return pe


class GPO(Pooling):
    """Generalised Pooling Operator (VSE∞, Chen et al. CVPR 2021).

    Each feature dimension is sorted in descending order over the valid tokens, then averaged with
    per-rank weights that a small BiGRU produces from positional encodings of the ranks. The
    weights depend only on the number of valid tokens, so GPO interpolates between mean pooling
    (uniform weights), max pooling (all weight on rank 0) and everything in between.

    Because the weights depend only on the length, they are computed once per call for every length
    the input's shape allows (a [N, N] table) and looked up per sample: the same numbers as VSE∞'s
    packed per-sample BiGRU, with no lengths on the host (``pack_padded_sequence`` needs them there,
    a device sync every step) and N + 1 GRU sequences instead of B.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32):
        super().__init__()
        self.d_pe = d_pe
        self.gru = nn.GRU(d_pe, d_hidden, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def weight_table(self, size: int, device: torch.device) -> Tensor:
        """Softmax weights over ranks for every length: [size, size], row l - 1 for l valid tokens,
        zero beyond rank l - 1.

        The forward GRU direction at rank t reads ranks 0..t only, so one full sequence serves every
        length. The backward direction of length l must start at rank l - 1 with a zero state (what
        packing does): row l of the batch holds ranks 0..l-1 right-aligned behind zeros, which the
        backward pass reads last.
        """
        pe = positional_encoding(size, self.d_pe, device, self.linear.weight.dtype)  # [S, p]
        ranks = torch.arange(size, device=device)
        lengths = ranks + 1
        shift = (size - lengths).unsqueeze(1)  # [S, 1]: where rank 0 of length l sits, right-aligned
        rank_at = ranks.unsqueeze(0) - shift  # [S (length), S (position)]; < 0: padding
        right_aligned = pe[rank_at.clamp_min(0)] * (rank_at >= 0).unsqueeze(-1).to(pe.dtype)
        out, _ = self.gru(torch.cat([pe.unsqueeze(0), right_aligned]))  # [S + 1, S, 2h]
        half = out.shape[-1] // 2
        forward = out[0, :, :half]  # [S (rank), h]
        position = (ranks.unsqueeze(0) + shift).clamp_max(size - 1)  # [S, S]: rank t of length l
        backward = out[1:, :, half:].gather(1, position.unsqueeze(-1).expand(-1, -1, half))  # [S, S, h]
        scores = self.linear((forward.unsqueeze(0) + backward) / 2).squeeze(-1)  # [S, S]
        scores = scores.masked_fill(ranks.unsqueeze(0) >= lengths.unsqueeze(1), -1e4)
        return torch.softmax(scores / 0.1, dim=1)  # temperature 0.1 as in VSE∞

    def rank_weights(self, lengths: Tensor, max_len: int) -> Tensor:
        """Softmax weights over ranks [B, max_len, 1] of lengths [B] (1 <= length <= max_len);
        zero beyond each sample's length."""
        with full_precision(lengths.device):
            table = self.weight_table(max_len, lengths.device)
        return table.index_select(0, lengths - 1).unsqueeze(-1)

    def pool(self, tokens: Tensor, mask: Tensor) -> Tensor:
        size = tokens.shape[1]
        lengths = mask.sum(1).clamp_min(1)
        # Masked tokens sort to the end (very negative), then contribute 0 with weight 0.
        fill = torch.finfo(tokens.dtype).min
        ordered = tokens.masked_fill(~mask.unsqueeze(-1), fill).sort(dim=1, descending=True).values
        rank_valid = torch.arange(size, device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)
        ordered = ordered.masked_fill(~rank_valid.unsqueeze(-1), 0.0)
        weights = self.rank_weights(lengths, size).to(ordered.dtype)
        return (ordered * weights).sum(1)


POOLINGS = {"mean": MeanPool, "max": MaxPool, "gpo": GPO}


def build_pooling(name: str) -> nn.Module:
    if name not in POOLINGS:
        raise ConfigError(f"model.pooling: unknown {name!r}; choose one of {', '.join(POOLINGS)}")
    return POOLINGS[name]()
