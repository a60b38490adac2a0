"""CDDS's terms as pure functions of tensors (METHODS.md "CDDS"; docs/methods.md "CDDS").

Related-semantics identification (CDDS 2), distribution sampling (CDDS 3) and the same sampling as a
value map for retrieval (CDDS 5), the decoupling constraints L_m, L_f, L_x (CDDS 4) and W's effective
support (a diagnostic). No config, no device logic, no logging: the model passes plain numbers and
tensors in.

Token matrices are the batch's *valid* tokens of one modality stacked as rows: ``[N, d]``, one
column per embedding dimension (a "column distribution" is the distribution of one dimension over
the batch's tokens). The model passes all tokens ``[M, d]`` with a validity mask instead, which
``sort_columns`` turns into the valid rows' order statistics without data-dependent shapes. Image
and text matrices have different row counts ``N_v`` and ``N_t``; the tokens of the two modalities
do not correspond, so every cross-modal comparison goes through *quantile positions* (empirical
CDF values in [0, 1]), never through row indices.
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
    return sort_columns(values)[1]


def sort_columns(values: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | int]:
    """One sort per column serving every quantile in CDDS 2, 3 and 5: the order statistics, each
    row's quantile position and the count, over the valid rows only, without data-dependent shapes.

    values [M, d], valid [M] bool (None: all rows) -> (sorted [M, d], positions [M, d], n):
    ``sorted[:n]`` ascending per column (the valid rows' values; rows n.. are 0), ``positions`` =
    ``rank / (n - 1)`` of every valid row within its column (ties broken by row order; padding rows
    rank after every valid row, so their positions exceed 1 and mean nothing), n = the number of
    valid rows (0-dim tensor; the int M when ``valid`` is None). The sort itself runs on detached
    values, so autograd stores one gather per column instead of a sort: ``sorted`` is differentiable
    w.r.t. ``values`` (the gradient of sort), ``positions`` carries none.
    """
    rows = values.shape[0]
    keys = values.detach()
    if valid is not None:  # padding sorts last: it never enters the first n order statistics
        keys = keys.masked_fill(~valid.unsqueeze(1), float("inf"))
    # Sorting the contiguous transpose along its last dim is ~1.5x faster than along dim 0.
    order = keys.t().contiguous().sort(dim=1, stable=True).indices.t()  # [M, d]
    ranks = torch.empty_like(order).scatter_(0, order, torch.arange(rows, device=values.device)
                                             .unsqueeze(1).expand_as(order))
    ordered = values.gather(0, order)
    if valid is None:
        return ordered, ranks.to(values.dtype) / max(rows - 1, 1), rows
    count = valid.sum()
    in_range = torch.arange(rows, device=values.device).unsqueeze(1) < count
    ordered = torch.where(in_range, ordered, 0.0)  # where, not a product: padding may hold anything
    return ordered, ranks.to(values.dtype) / (count - 1).clamp_min(1).to(values.dtype), count


def quantile_lookup(sorted_columns: Tensor, positions: Tensor, count: Tensor | int | None = None) -> Tensor:
    """Q(u): each column's value at quantile position u, interpolating linearly between order statistics.

    sorted_columns [N_t, d] (ascending per column), positions [M, d] in [0, 1] -> [M, d]. Position u
    sits at fractional index ``u (n - 1)``, so u = rank / (N_s - 1) of an N_s-row column lands on
    the same relative rank of an n-row column (reconstructed Q_j). ``count`` n: only the first n rows
    are order statistics (``sort_columns`` with a mask; a 0-dim tensor); default N_t.
    Differentiable w.r.t. the gathered ``sorted_columns``; positions are treated as constants.
    """
    n = sorted_columns.shape[0] if count is None else count
    if isinstance(n, Tensor):
        last = (n - 1).clamp_min(0).to(positions.dtype)
        index = positions.detach() * last
        lower = torch.minimum(index.floor().clamp_min(0), last)
        upper = torch.minimum(lower + 1, last)
    else:
        index = positions.detach() * (n - 1)
        lower = index.floor().clamp(0, n - 1)
        upper = (lower + 1).clamp_max(n - 1)
    frac = (index - lower).to(sorted_columns.dtype)
    return (sorted_columns.gather(0, lower.long()) * (1 - frac)
            + sorted_columns.gather(0, upper.long()) * frac)


def sample_sorted(sorted_target: Tensor, weights: Tensor, positions: Tensor,
                  count: Tensor | int | None = None) -> Tensor:
    """Distribution sampling from the target's order statistics (``sort_columns``): sorted_target
    [N_t, d] (first ``count`` rows valid), weights W [d, d], positions [M, d] of the source values
    -> [M, d], ``X[:, i] = Σ_j W_ij Q_j^target(positions[:, i])``. See ``distribution_sample``."""
    mixed = sorted_target @ weights.t()  # [N_t, d]: column i = Σ_j W_ij sorted(target[:, j])
    return quantile_lookup(mixed, positions, count)


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
    return sample_sorted(sort_columns(target)[0], weights, quantile_positions(source))


def resample_sorted(sorted_columns: Tensor, num_positions: int, count: Tensor | int | None = None) -> Tensor:
    """Each column's empirical quantiles at ``num_positions`` evenly spaced positions in [0, 1], from
    its order statistics (``sort_columns``; the first ``count`` rows). -> [num_positions, d], ascending."""
    positions = torch.linspace(0.0, 1.0, num_positions, device=sorted_columns.device,
                               dtype=sorted_columns.dtype).unsqueeze(1)
    return quantile_lookup(sorted_columns, positions.expand(-1, sorted_columns.shape[1]), count)


def resample_columns(values: Tensor, num_positions: int) -> Tensor:
    """Each column's empirical quantiles at ``num_positions`` evenly spaced positions in [0, 1].

    values [N, d] -> [num_positions, d], ascending per column; identity on sorted columns when
    num_positions = N. Puts columns of different lengths on one support (reconstructed).
    """
    return resample_sorted(values.sort(0).values, num_positions)


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
    return table_log_distributions(resample_columns(values, num_positions), temperature)


def table_log_distributions(table: Tensor, temperature: float) -> Tensor:
    """``log C_i`` from a quantile table (``resample_sorted``): table [K, d] -> log C [d, K]."""
    return torch.log_softmax(table.t() / temperature, dim=1)


def kl_matrix(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``S_ij = KL(p_i ‖ q_j)`` for all pairs of rows (CDDS 2, known).

    log_p [d, K], log_q [d', K] (log-probabilities over the same K bins) -> S [d, d'], >= 0.
    Written as negative entropy minus a cross-entropy matmul, never as a [d, d', K] tensor.
    """
    p = log_p.exp()
    return (p * log_p).sum(1, keepdim=True) - p @ log_q.t()


def related_probability(kl: Tensor, kl_temperature: float = 1.0, relative: bool = True,
                        eps: float = 1e-12) -> Tensor:
    """``P(j|i) = softmax_j(-S_ij / τ_S)`` (CDDS 2; known: a conditional probability from the KL
    matrix; reconstructed: the temperature).

    kl S [d, d'] -> P [d, d'], rows sum to 1. ``relative=True``: ``τ_S = kl_temperature · std_j S_ij``
    (population std, ``eps`` under the square root), so P is invariant to ``S_i· -> a_i S_i· + b_i``
    (a_i > 0) and the same ``kl_temperature`` means the same sharpness at any d, τ_c or feature
    scale; raw KL values are ~1e-4..3e-2, where the literal ``softmax(-S)`` is uniform to 2 %.
    ``relative=False``: ``τ_S = kl_temperature`` literally (1.0 = the spec's ``softmax(-S)``).
    """
    if relative:
        kl_temperature = (kl.var(1, unbiased=False, keepdim=True) + eps).sqrt() * kl_temperature
    return torch.softmax(-kl / kl_temperature, dim=1)


def related_weights(kl: Tensor, alpha: Tensor, temperature: float, relative: bool = True,
                    kl_temperature: float = 1.0, kl_relative: bool = True,
                    eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Soft-thresholded related-semantics weights from the KL matrix (CDDS 2).

    kl S [d, d], alpha [d] (one threshold weight per row) -> (W [d, d], gate [d, d]):
    ``P(j|i) = related_probability(S)``; ``κ_i = mean_j P + α_i std_j P``;
    ``gate_ij = sigmoid((P(j|i) - κ_i) / T)``; ``W_ij = P(j|i) gate_ij`` normalised over j.
    Known: conditional probability, threshold from its mean and std weighted by a learnable α.
    Reconstructed: the exact forms. ``relative=True`` measures T in units of ``std_j P(j|i)``
    (P is ~1/d, so a fixed T would need to shrink with d); ``relative=False`` is the literal form.
    T -> 0 makes the gate the hard indicator ``P(j|i) > κ_i``.
    """
    prob = related_probability(kl, kl_temperature, kl_relative, eps)
    mean = prob.mean(1, keepdim=True)
    std = (prob.var(1, unbiased=False, keepdim=True) + eps).sqrt()  # eps: finite gradient when P is flat
    kappa = mean + alpha.unsqueeze(1) * std
    scale = temperature * std if relative else temperature
    gate = torch.sigmoid((prob - kappa) / scale)
    weights = prob * gate
    return weights / weights.sum(1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny), gate


def related_semantics(source: Tensor, target: Tensor, alpha: Tensor, column_temperature: float,
                      mask_temperature: float, relative: bool = True, kl_temperature: float = 1.0,
                      kl_relative: bool = True, num_positions: int | None = None) -> tuple[Tensor, Tensor]:
    """CDDS 2 end to end for one side: source [N_s, d], target [N_t, d] valid tokens, alpha [d]
    -> (W [d, d], gate [d, d]) with row i = source column i, column j = target column j.
    Columns are compared on ``K = num_positions`` quantile positions (default ``min(N_s, N_t)``); on
    quantile tables that are already sorted at K positions the resampling is the identity."""
    k = num_positions or min(source.shape[0], target.shape[0])
    return related_semantics_of_tables(resample_columns(source, k), resample_columns(target, k), alpha,
                                       column_temperature, mask_temperature, relative, kl_temperature,
                                       kl_relative)


def related_semantics_of_tables(source: Tensor, target: Tensor, alpha: Tensor, column_temperature: float,
                                mask_temperature: float, relative: bool = True, kl_temperature: float = 1.0,
                                kl_relative: bool = True) -> tuple[Tensor, Tensor]:
    """``related_semantics`` on quantile tables already at K common positions (``resample_sorted``):
    source, target [K, d] -> (W [d, d], gate [d, d]). Lets one sort per modality serve both sides."""
    kl = kl_matrix(table_log_distributions(source, column_temperature),
                   table_log_distributions(target, column_temperature))
    return related_weights(kl, alpha, mask_temperature, relative, kl_temperature, kl_relative)


def effective_support(weights: Tensor) -> Tensor:
    """``exp(H(W_i·))`` averaged over rows: how many columns each row really mixes.

    weights [d, d'] (rows sum to 1, entries >= 0) -> 0-dim, in [1, d']: 1 for one-hot rows, d' for
    uniform rows. Unlike a count of gate > 0.5 it weighs columns by their mass in W.
    """
    entropy = -torch.special.xlogy(weights, weights).sum(1)
    return entropy.exp().mean()


# ---------------------------------------------------------------------------------------------
# The same sampling at evaluation: running quantile tables (reconstructed retrieval score)
# ---------------------------------------------------------------------------------------------

def transport_table(source: Tensor, target: Tensor, weights: Tensor,
                    num_positions: int) -> tuple[Tensor, Tensor]:
    """The sampling map of ``distribution_sample(source, target, W)`` as two tables at K =
    ``num_positions`` evenly spaced quantile positions u_k = k/(K-1).

    source [N_s, d], target [N_t, d], weights [d, d] -> (knots [K, d], values [K, d]), ascending per
    column: ``knots[k, i]`` = source column i's quantile at u_k, ``values[k, i] = Σ_j W_ij Q_j(u_k)``
    (mixing commutes with the interpolation: the same weights for every j). ``apply_transport`` with
    these tables maps a source value at quantile u to the mixed target quantile at u, as the batch
    map does, but as a function of the value alone. On tables sorted at K positions (running
    quantiles) it returns ``(source, target @ Wᵀ)``.
    """
    return resample_columns(source, num_positions), resample_columns(target, num_positions) @ weights.t()


def apply_transport(values: Tensor, knots: Tensor, table: Tensor) -> Tensor:
    """Per-column piecewise-linear monotone map through (knots -> table): ``F̂_i`` from the knots,
    then ``Q̂`` from the table at the same position (both tables at the same K positions).

    values [..., d], knots [K, d] (ascending per column, K >= 2), table [K, d] -> [..., d]. Values
    outside a column's knot range map to the table's end (the CDF is clamped to [0, 1]); a value equal
    to a run of tied knots maps to the run's last entry. Differentiable w.r.t. values and table;
    O(numel · log K).
    """
    flat = values.reshape(-1, values.shape[-1]).t().contiguous()  # [d, M]
    k_cols = knots.t().contiguous()  # [d, K]
    upper = torch.searchsorted(k_cols, flat.detach(), right=True).clamp(1, knots.shape[0] - 1)
    lower = upper - 1
    left, right = k_cols.gather(1, lower), k_cols.gather(1, upper)
    width = right - left
    frac = ((flat - left) / width.clamp_min(torch.finfo(width.dtype).tiny)).clamp(0, 1)
    frac = torch.where(width > 0, frac, (flat >= right).to(frac.dtype))
    t_cols = table.t()
    mapped = t_cols.gather(1, lower) * (1 - frac) + t_cols.gather(1, upper) * frac  # [d, M]
    return mapped.t().reshape(values.shape)


# ---------------------------------------------------------------------------------------------
# Decoupling constraints (CDDS 4)
# ---------------------------------------------------------------------------------------------

def reduce_samples(values: Tensor, mask: Tensor, reduction: str = "sum") -> Tensor:
    """values [B, N], mask [B, N] -> scalar: each sample's mean over its valid tokens, then the sum
    (``reduction="sum"``) or the mean (``"mean"``) over samples; a sample without valid tokens counts 0.

    The normalisation of every CDDS constraint (reconstructed): per sample a mean, so an image's R
    regions and a caption's L words count equally; over samples the reduction of the alignment loss
    L_s (``CddsModel.reduction``: the hinge sums over its queries, InfoNCE averages), so a sample's
    weight relative to L_s does not change with the batch size. A batch mean under the summed hinge
    made L_m's encoder gradient 0.4 % of L_s's at unit weight and shrank every constraint as 1/B.
    """
    per_sample = torch.where(mask, values, 0.0).sum(1) / mask.sum(1).clamp_min(1)
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def modality_consistency_loss(modality: Tensor, mask: Tensor, reduction: str = "sum") -> Tensor:
    """``L_m`` for one modality (CDDS 4; known: "KL between each token's softmaxed modality component
    and the mean over its sample's tokens"; reconstructed: direction and normalisation).

    modality [B, N, d], mask [B, N] bool -> scalar: ``reduce_samples`` of
    ``KL(softmax(m_bn) ‖ mean_{n' valid} softmax(m_bn'))``. Zero iff every valid token of a sample
    has the same softmaxed modality component: modality information is shared by the whole sample.
    """
    log_p = torch.log_softmax(modality, dim=-1)
    p = log_p.exp()
    valid = mask.unsqueeze(-1).to(p.dtype)
    mean = (p * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp_min(1.0)
    log_mean = mean.clamp_min(torch.finfo(p.dtype).tiny).log()
    return reduce_samples((p * (log_p - log_mean)).sum(-1), mask, reduction)


def completeness_loss(reconstruction: Tensor, target: Tensor, mask: Tensor, reduction: str = "sum") -> Tensor:
    """One modality's half of ``L_f = ‖w_s V^s + w_m V^m − V‖²`` or
    ``L_x = ‖w_x V^x + w_m V^m − V‖²`` (CDDS 4; known form, reconstructed normalisation).

    reconstruction, target [B, N, d], mask [B, N] -> scalar: squared error averaged over dimensions
    (so the weight does not scale with d), then ``reduce_samples``. Exactly 0 for an exact
    reconstruction; padded positions never count.
    """
    return reduce_samples((reconstruction - target).pow(2).mean(-1), mask, reduction)
