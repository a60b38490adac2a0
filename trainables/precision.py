"""Where full precision is kept when the encoders run under bf16/fp16 autocast.

Autocast is for the encoders (matmul-heavy, tolerant of 8 mantissa bits). What comes after them is
cheap ([B, B] similarities, [B, d] poolings) and numerically fragile: a bf16 cosine is quantised to
~0.004, a 0.08-logit step at τ = 0.05, so hardest negatives tie; Δ^inter / Δ^intra are differences of
two such distances that the loss drives to zero; the sparse-mask thresholds, CDDS's KL and GPO's GRU
(cuDNN runs it in fp16 under autocast) are no better. So pooling, similarities and every loss term run
in an fp32 island: autocast off, half-precision inputs upcast. float64 (gradcheck) is left alone.
"""

from __future__ import annotations

from typing import ContextManager

import torch
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 if it is a half-precision float; any other tensor unchanged (no copy)."""
    return x.float() if x.dtype in HALF else x


def upcast_all(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every half-precision float tensor of ``tensors`` in float32; the rest (masks, ids) as is."""
    return {name: upcast(value) if isinstance(value, Tensor) else value for name, value in tensors.items()}


def full_precision(device: torch.device | str) -> ContextManager:
    """Autocast switched off on ``device``'s type (a no-op where it was off already)."""
    return torch.autocast(torch.device(device).type, enabled=False)
