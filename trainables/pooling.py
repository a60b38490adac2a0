"""Pool token embeddings [B, N, d] with a validity mask [B, N] into one vector per sample [B, d]."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from trainables.errors import ConfigError


class MeanPool(nn.Module):
    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class MaxPool(nn.Module):
    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return tokens.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)


def positional_encoding(length: int, dim: int, device: torch.device, dtype=torch.float32) -> Tensor:
    """Sinusoidal encodings [length, dim] of the sorted-rank positions GPO weights."""
    position = torch.arange(length, device=device, dtype=dtype).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=dtype) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device, dtype=dtype)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)
    return pe


class GPO(nn.Module):
    """Generalised Pooling Operator (VSE∞, Chen et al. CVPR 2021).

    Each feature dimension is sorted in descending order over the valid tokens, then averaged with
    per-rank weights that a small BiGRU produces from positional encodings of the ranks. The
    weights depend only on the number of valid tokens, so GPO interpolates between mean pooling
    (uniform weights), max pooling (all weight on rank 0) and everything in between.
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32):
        super().__init__()
        self.d_pe = d_pe
        self.gru = nn.GRU(d_pe, d_hidden, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def rank_weights(self, lengths: Tensor, max_len: int) -> Tensor:
        """Softmax weights over ranks [B, max_len, 1]; zero beyond each sample's length."""
        batch = lengths.shape[0]
        ranks = torch.arange(max_len, device=lengths.device).expand(batch, max_len)
        valid = (ranks < lengths.unsqueeze(1)).unsqueeze(-1)
        pes = positional_encoding(max_len, self.d_pe, lengths.device, self.linear.weight.dtype).expand(batch, -1, -1)
        packed = pack_padded_sequence(pes * valid, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)
        half = out.shape[-1] // 2
        scores = self.linear((out[..., :half] + out[..., half:]) / 2)
        scores = scores.masked_fill(~valid, -1e4)
        return torch.softmax(scores / 0.1, dim=1)  # temperature 0.1 as in VSE∞

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        lengths = mask.sum(1).clamp_min(1)
        # Masked tokens sort to the end (very negative), then contribute 0 with weight 0.
        fill = torch.finfo(tokens.dtype).min
        ordered = tokens.masked_fill(~mask.unsqueeze(-1), fill).sort(dim=1, descending=True).values
        max_len = int(lengths.max())
        ordered = ordered[:, :max_len]
        rank_valid = torch.arange(max_len, device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)
        ordered = ordered.masked_fill(~rank_valid.unsqueeze(-1), 0.0)
        weights = self.rank_weights(lengths, max_len).to(ordered.dtype)
        return (ordered * weights).sum(1)


POOLINGS = {"mean": MeanPool, "max": MaxPool, "gpo": GPO}


def build_pooling(name: str) -> nn.Module:
    if name not in POOLINGS:
        raise ConfigError(f"model.pooling: unknown {name!r}; choose one of {', '.join(POOLINGS)}")
    return POOLINGS[name]()
