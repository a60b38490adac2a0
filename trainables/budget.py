"""The term budget (METHODS.md "Rules for both methods"): how much each weighted loss term moves the
shared encoders.

For terms ``w_k L_k`` and the shared encoder parameters θ (image encoder and the trainable part of the
text encoder: every term of every method reaches them), a term's share is

    share_k = ‖∇_θ (w_k L_k)‖ / Σ_j ‖∇_θ (w_j L_j)‖

so shares sum to 1 over the terms that reach θ. A term whose share is ~0 at its shipped weight cannot
change the result: its ablation row measures nothing. The loop measures the budget on the first batch
of every epoch (``budget/<term>``, with the weighted value as ``weighted/<term>``); ``python -m
benchmarks.term_budget`` tables it for every method.
"""

from __future__ import annotations

import torch
from torch import Tensor


def term_gradient_norms(terms: dict[str, Tensor], weights: dict[str, float],
                        params: list[Tensor]) -> dict[str, float]:
    """``‖∇_params (w_k L_k)‖`` per term (0 for a term that does not reach ``params``).
    The graph is kept, so the caller may still backpropagate the total."""
    norms = {}
    for name, value in terms.items():
        weight = weights.get(name, 1.0)
        if weight == 0 or not value.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(weight * value, params, retain_graph=True, allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        norms[name] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    return norms


def shares(norms: dict[str, float]) -> dict[str, float]:
    """Each norm over their sum (all 0 when nothing reaches the parameters)."""
    total = sum(norms.values())
    return {name: (value / total if total > 0 else 0.0) for name, value in norms.items()}


def term_budget(terms: dict[str, Tensor], weights: dict[str, float], params: list[Tensor]) -> dict[str, float]:
    """``{"budget/<term>": share, "weighted/<term>": w_k L_k}``: the metrics the loop logs."""
    out = {f"budget/{name}": share for name, share in shares(term_gradient_norms(terms, weights, params)).items()}
    out.update({f"weighted/{name}": float(weights.get(name, 1.0) * value.detach())
                for name, value in terms.items()})
    return out
