"""CDDS's terms as pure functions of tensors (METHODS.md "CDDS"; docs/methods.md "CDDS").

Related-semantics identification (CDDS 2), distribution sampling (CDDS 3) and the decoupling
constraints L_m, L_f, L_x (CDDS 4). No config, no device logic, no logging: the model passes plain
numbers and tensors in.

Token matrices are the batch's *valid* tokens of one modality stacked as rows: ``[N, d]``, one
column per embedding dimension (a "column distribution" is the distribution of one dimension over
the batch's tokens). Image and text matrices have different row counts ``N_v`` and ``N_t``; the
tokens of the two modalities do not correspond, so every cross-modal comparison goes through
*quantile positions* (empirical CDF values in [0, 1]), never through row indices.
"""

from __future__ import annotations

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Empirical quantiles (CDDS 3: "sort-based, differentiable through the gathered values")
# ---------------------------------------------------------------------------------------------

def quantile_positions(values: Tensor) -> Tensor:
    """Empirical CDF position of every entry within its column: ``rank / (N - 1)``.

    values [N, d] -> positions [N, d] in [0, 1] (0 = column minimum, 1 = maximum; ties broken by
    row order). Piecewise constant in ``values``, so it carries no gradient (reconstructed F_i).
    """
    ranks = values.detach().argsort(0).argsort(0)
    return ranks.to(values.dtype) / max(values.shape[0] - 1, 1)


def quantile_lookup(sorted_columns: Tensor, positions: Tensor) -> Tensor:
    """Q(u): each column's value at quantile position u, interpolating linearly between order statistics.

    sorted_columns [N_t, d] (ascending per column), positions [M, d] in [0, 1] -> [M, d]. Position u
    sits at fractional index ``u (N_t - 1)``, so u = rank / (N_s - 1) of an N_s-row column lands on
    the same relative rank of an N_t-row column (reconstructed Q_j). Differentiable w.r.t. the
    gathered ``sorted_columns``; positions are treated as constants.
    """
    n = sorted_columns.shape[0]
    index = positions.detach() * (n - 1)
    lower = index.floor().clamp(0, n - 1)
    frac = (index - lower).to(sorted_columns.dtype)
    lower = lower.long()
    upper = (lower + 1).clamp_max(n - 1)
    return sorted_columns.gather(0, lower) * (1 - frac) + sorted_columns.gather(0, upper) * frac


def distribution_sample(source: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """Distribution sampling, CDDS 3 (form known, details reconstructed):
    ``X[:, i] = Σ_j W_ij Q_j^target(F_i^source(source[:, i]))``.

    source [N_s, d], target [N_t, d], weights W [d, d] (row i: source column i over target columns j)
    -> X [N_s, d]. The interpolation weights of ``Q_j(u)`` depend on u and N_t but not on j, so the
    mixture over j equals one lookup in the W-mixed sorted target columns: an [N_t, d] x [d, d]
    matmul instead of an [N_s, d, d] tensor. Mixing ascending columns with W >= 0 keeps them
    ascending, so X preserves the rank order of every source column. With W = I it is the plain
    column-wise quantile map: every source value replaced by the target column's value at the same
    empirical quantile.
    """
    mixed = target.sort(0).values @ weights.t()  # [N_t, d]: column i = Σ_j W_ij sorted(target[:, j])
    return quantile_lookup(mixed, quantile_positions(source))


def resample_columns(values: Tensor, num_positions: int) -> Tensor:
    """Each column's empirical quantiles at ``num_positions`` evenly spaced positions in [0, 1].

    values [N, d] -> [num_positions, d], ascending per column; identity on sorted columns when
    num_positions = N. Puts columns of different lengths on one support (reconstructed).
    """
    positions = torch.linspace(0.0, 1.0, num_positions, device=values.device, dtype=values.dtype)
    return quantile_lookup(values.sort(0).values, positions.unsqueeze(1).expand(-1, values.shape[1]))


# ---------------------------------------------------------------------------------------------
# Related-semantics identification (CDDS 2)
# ---------------------------------------------------------------------------------------------

def column_log_distributions(values: Tensor, num_positions: int, temperature: float) -> Tensor:
    """``log C_i``: column i's softmax over the batch's tokens, ``C_i = softmax(column_i / τ_c)``.

    values [N, d] -> log C [d, K], K = num_positions. Known: a softmax over the batch's tokens with
    temperature τ_c. Reconstructed: tokens of two modalities do not correspond, so each column is
    first sorted and resampled to K common quantile positions; C_i is then a distribution over
    quantile ranks, comparable between an image column and a text column.
    """
    return torch.log_softmax(resample_columns(values, num_positions).t() / temperature, dim=1)


def kl_matrix(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``S_ij = KL(p_i ‖ q_j)`` for all pairs of rows (CDDS 2, known).

    log_p [d, K], log_q [d', K] (log-probabilities over the same K bins) -> S [d, d'], >= 0.
    Written as negative entropy minus a cross-entropy matmul, never as a [d, d', K] tensor.
    """
    p = log_p.exp()
    return (p * log_p).sum(1, keepdim=True) - p @ log_q.t()


def related_weights(kl: Tensor, alpha: Tensor, temperature: float, relative: bool = True,
                    eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Soft-thresholded related-semantics weights from the KL matrix (CDDS 2).

    kl S [d, d], alpha [d] (one threshold weight per row) -> (W [d, d], gate [d, d]):
    ``P(j|i) = softmax_j(-S_ij)``; ``κ_i = mean_j P + α_i std_j P``;
    ``gate_ij = sigmoid((P(j|i) - κ_i) / T)``; ``W_ij = P(j|i) gate_ij`` normalised over j.
    Known: conditional probability, threshold from its mean and std weighted by a learnable α.
    Reconstructed: the exact forms. ``relative=True`` measures T in units of ``std_j P(j|i)``
    (P is ~1/d, so a fixed T would need to shrink with d); ``relative=False`` is the literal form.
    """
    prob = torch.softmax(-kl, dim=1)
    mean = prob.mean(1, keepdim=True)
    std = (prob.var(1, unbiased=False, keepdim=True) + eps).sqrt()  # eps: finite gradient when P is flat
    kappa = mean + alpha.unsqueeze(1) * std
    scale = temperature * std if relative else temperature
    gate = torch.sigmoid((prob - kappa) / scale)
    weights = prob * gate
    return weights / weights.sum(1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny), gate


def related_semantics(source: Tensor, target: Tensor, alpha: Tensor, column_temperature: float,
                      mask_temperature: float, relative: bool = True) -> tuple[Tensor, Tensor]:
    """CDDS 2 end to end for one side: source [N_s, d], target [N_t, d] valid tokens, alpha [d]
    -> (W [d, d], gate [d, d]) with row i = source column i, column j = target column j.
    Columns are compared on ``K = min(N_s, N_t)`` quantile positions."""
    k = min(source.shape[0], target.shape[0])
    kl = kl_matrix(column_log_distributions(source, k, column_temperature),
                   column_log_distributions(target, k, column_temperature))
    return related_weights(kl, alpha, mask_temperature, relative)


# ---------------------------------------------------------------------------------------------
# Decoupling constraints (CDDS 4)
# ---------------------------------------------------------------------------------------------

def modality_consistency_loss(modality: Tensor, mask: Tensor) -> Tensor:
    """``L_m`` for one modality (CDDS 4; known: "KL between each token's softmaxed modality component
    and the mean over its sample's tokens"; reconstructed: direction and averaging).

    modality [B, N, d], mask [B, N] bool -> scalar: mean over valid tokens of
    ``KL(softmax(m_bn) ‖ mean_{n' valid} softmax(m_bn'))``. Zero iff every valid token of a sample
    has the same softmaxed modality component: modality information is shared by the whole sample.
    """
    log_p = torch.log_softmax(modality, dim=-1)
    p = log_p.exp()
    valid = mask.unsqueeze(-1).to(p.dtype)
    mean = (p * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp_min(1.0)
    log_mean = mean.clamp_min(torch.finfo(p.dtype).tiny).log()
    kl = (p * (log_p - log_mean)).sum(-1)  # [B, N]
    return torch.where(mask, kl, 0.0).sum() / mask.sum().clamp_min(1)


def completeness_loss(reconstruction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """One modality's half of ``L_f = ‖w_s V^s + w_m V^m − V‖²`` or
    ``L_x = ‖w_x V^x + w_m V^m − V‖²`` (CDDS 4; known form, reconstructed normalisation).

    reconstruction, target [B, N, d], mask [B, N] -> scalar: squared error averaged over dimensions
    (so the weight α_f does not scale with d) and over valid tokens. Exactly 0 for an exact
    reconstruction; padded positions never count.
    """
    err = (reconstruction - target).pow(2).mean(-1)
    return torch.where(mask, err, 0.0).sum() / mask.sum().clamp_min(1)
