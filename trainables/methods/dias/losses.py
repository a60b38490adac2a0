"""DIAS loss terms (METHODS.md "DIAS"), pure functions of tensors.

Notation as in METHODS.md: a batch of B matched pairs; regions ``[B, R, d]`` and words ``[B, L, d]``
with validity masks; ``img``, ``txt`` ``[B, d]`` are the pooled, l2-normalised global embeddings
``v_i``, ``t_i``. The paper's full text was not available, so every formula here is marked either
*known* (stated by the paper's abstract / figure captions) or *reconstructed* (our concrete choice).

No config objects, devices or logging in here: the model (``model.py`` beside this file) picks the
variant, multiplies each term by L_align's batch scale (``DiasModel.batch_scale``) and supplies the
weights; the loop forms the weighted total.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# --- 1. local region-word interaction (training path only) ------------------------------------


def cross_attend(regions: Tensor, region_mask: Tensor, words: Tensor, word_mask: Tensor,
                 temperature: float) -> tuple[Tensor, Tensor]:
    """Region-word cosine attention within each matched pair, both directions (METHODS.md DIAS 1).

    Known: the paper computes local region/word interactions. Reconstructed: the form
    ``A = softmax(cos(V_i, T_i) / τ_a)`` (SCAN-style), applied row-wise and column-wise.

    regions [B, R, d], region_mask [B, R] bool, words [B, L, d], word_mask [B, L] bool ->
      ``words_for_regions`` [B, R, d]: region r's text context ``Σ_w softmax_w(cos(V_r, T_w)/τ_a) T_w``;
      ``regions_for_words`` [B, L, d]: word w's image context ``Σ_r softmax_r(cos(V_r, T_w)/τ_a) V_r``.
    Rows of padded tokens are garbage-but-finite; callers drop them with the masks.
    """
    # cos = dot / (|V_r| |T_w|), dividing the small [B, R, L] matrix instead of normalising the
    # [B, R, d] / [B, L, d] token tensors: the same numbers, two fewer full-size passes (benchmark).
    norms = regions.norm(dim=-1).unsqueeze(2) * words.norm(dim=-1).unsqueeze(1)  # [B, R, L]
    logits = (regions @ words.transpose(1, 2)) / (norms.clamp_min(1e-12) * temperature)  # [B, R, L]
    # finfo.min instead of -inf: an all-padded row then softmaxes to uniform instead of NaN.
    fill = torch.finfo(logits.dtype).min
    region_to_word = logits.masked_fill(~word_mask.unsqueeze(1), fill).softmax(dim=2)  # [B, R, L]
    word_to_region = logits.masked_fill(~region_mask.unsqueeze(2), fill).softmax(dim=1)  # [B, R, L]
    return region_to_word @ words, word_to_region.transpose(1, 2) @ regions


_PRIME = 2**31 - 1  # residues below it multiply without overflowing int64
_SCRAMBLE = (1_103_515_245, 1_597_334_677, 2_045_278_849)


def _scramble(x: Tensor) -> Tensor:
    """A fixed pseudo-random map of int64 residues in [0, _PRIME) to themselves (multiply-xorshift
    rounds; the xorshift makes it non-affine, so neighbouring slots get unrelated keys)."""
    for factor in _SCRAMBLE:
        x = (x * factor) % _PRIME
        x = x ^ (x >> 13)
    return x % _PRIME


def batch_seed(image_ids: Tensor) -> Tensor:
    """A seed [] int64 computed on the device from the batch's image ids (order included): every
    DDP rank sees the same gathered batch and so draws the same rows, each batch draws new ones,
    training's RNG is left alone, and the host never reads the ids (a sync per step)."""
    position = torch.arange(image_ids.shape[0], device=image_ids.device)
    keyed = _scramble((_scramble(image_ids.long() % _PRIME) + position) % _PRIME)
    return _scramble(keyed.sum() % _PRIME)


def random_keys(seed: Tensor, count: int, salt: int = 0) -> Tensor:
    """Pseudo-random sort keys [count] int64 in [0, _PRIME) for the positions ``range(count)``, a
    function of ``seed`` [] and ``salt`` only (no RNG state): sorting by them is a random order."""
    slots = torch.arange(count, device=seed.device)
    return _scramble((_scramble((seed + salt) % _PRIME) + slots) % _PRIME)


def pick_valid(valid: Tensor, keys: Tensor, size: int) -> Tensor:
    """The first ``size`` positions [size] of ``valid`` [count] bool in ``keys`` order, every valid
    position before every invalid one; the first ``m`` of them are a uniformly random subset of
    the valid positions for any ``m`` <= #valid. Fixed shapes, so nothing is read on the host."""
    order = torch.where(valid, keys, _PRIME).sort(stable=True).indices
    return order[:size]


def dim_alignment_rows(regions: Tensor, region_mask: Tensor, words: Tensor, word_mask: Tensor,
                       words_for_regions: Tensor, regions_for_words: Tensor, max_rows: int | None = None,
                       seed: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The matrices ``M_V``, ``M_T`` [K, d] whose columns L_dim aligns (METHODS.md DIAS 2), and the
    0/1 weights ``keep`` [K] of their rows.

    Known: L_dim works on the local embeddings, one row per token. Reconstructed: row n of ``M_V`` and
    row n of ``M_T`` describe the *same* token in both modalities — a region with its text context
    (``regions``, ``words_for_regions``) or an image context with its word (``regions_for_words``,
    ``words``) — so that a cross-correlation of columns is meaningful. The two token kinds are
    equalised in count (N = fewer of valid regions / valid words, capped at ``max_rows // 2``) by
    a random subset of each kind's valid tokens over the whole batch (:func:`pick_valid`, keys from
    ``seed``), so neither modality dominates the column statistics and every token can be a row.

    N depends on the masks, so instead of N rows (a data-dependent shape: a host sync) the result
    has a fixed K = min(cap, B·R) + min(cap, B·L) rows, the kept ones first within each kind; the
    rest are zero with ``keep`` 0. ``cross_correlation(m_v, m_t, keep)`` equals the correlation of
    the 2N kept rows alone.
    """
    d = regions.shape[-1]
    seed = torch.zeros((), dtype=torch.int64, device=regions.device) if seed is None else seed
    region_valid, word_valid = region_mask.flatten(), word_mask.flatten()
    cap = max_rows // 2 if max_rows is not None else max(region_valid.numel(), word_valid.numel())
    n = torch.minimum(region_valid.sum(), word_valid.sum()).clamp_max(cap)  # [] on the device
    region_rows = pick_valid(region_valid, random_keys(seed, region_valid.numel(), 1),
                             min(cap, region_valid.numel()))
    word_rows = pick_valid(word_valid, random_keys(seed, word_valid.numel(), 2), min(cap, word_valid.numel()))
    keep = torch.cat([torch.arange(len(region_rows), device=n.device) < n,
                      torch.arange(len(word_rows), device=n.device) < n])
    m_v = torch.cat([regions.reshape(-1, d)[region_rows], regions_for_words.reshape(-1, d)[word_rows]])
    m_t = torch.cat([words_for_regions.reshape(-1, d)[region_rows], words.reshape(-1, d)[word_rows]])
    # where, not a product: a padded token's garbage (even a NaN) must not reach the statistics.
    row_keep = keep.unsqueeze(1)
    return torch.where(row_keep, m_v, 0.0), torch.where(row_keep, m_t, 0.0), keep.to(m_v.dtype)


# --- 2. L_dim: dimension information alignment ------------------------------------------------


def cross_correlation(m_v: Tensor, m_t: Tensor, weight: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """[N, d] x [N, d] -> [d, d] cross-correlation of standardised columns (METHODS.md DIAS 2).

    ``C_ab = (1/N) Σ_n ẑ_v[n, a] ẑ_t[n, b]`` with columns standardised by their batch mean and
    population std (``sqrt(var + eps)``, the BatchNorm guard: constant columns give 0, not NaN).
    Without eps this is the Pearson correlation, i.e. the cosine of the centred, l2-normalised columns.
    ``weight`` [N] (0/1, default all 1) keeps rows out: the result equals that of the rows with
    weight 1 alone (``dim_alignment_rows`` marks its padding rows so, at a fixed shape).
    Known: a cross-correlation of dimension vectors. Reconstructed: standardisation details.
    """
    # Centred before the products (not the raw moments E[xy] − E[x]E[y], which cancel when
    # |column mean| >> column std); the two extra [N, d] passes are cheap next to the matmul.
    share = (weight if weight is not None else m_v.new_ones(m_v.shape[0])).unsqueeze(1)
    share = share / share.sum().clamp_min(1e-12)  # [N, 1], sums to 1 over the kept rows
    centred_v = m_v - (share * m_v).sum(0)
    centred_t = m_t - (share * m_t).sum(0)
    var_v = (share * centred_v.pow(2)).sum(0)
    var_t = (share * centred_t.pow(2)).sum(0)
    cov = (share * centred_v).t() @ centred_t  # [d, d]
    return cov / ((var_v + eps).sqrt().unsqueeze(1) * (var_t + eps).sqrt().unsqueeze(0))


def barlow_dim_loss(corr: Tensor, lambda_offdiag: float) -> Tensor:
    """Variant ``barlow`` (default, reconstructed): ``[Σ_i (1 − C_ii)² + λ_off Σ_{i≠j} C_ij²] / d``.

    Aligned dimensions correlate, the others decorrelate ("decorrelating non-corresponding
    dimensions", known). We divide METHODS.md's sum by d so λ_dim means the same at any embed_dim.
    The gradient scale every variant is matched to: ``∂/∂C_ii = −2(1 − C_ii)/d``.
    corr [d, d] -> scalar.
    """
    diag = corr.diagonal()
    offdiag = corr.pow(2).sum() - diag.pow(2).sum()
    return ((1 - diag).pow(2).sum() + lambda_offdiag * offdiag) / corr.shape[0]


def diag_share_sum_dim_loss(corr: Tensor, eps: float = 1e-8) -> Tensor:
    """Variant ``diag_share_sum`` (the public reimplementation's form, METHODS.md DIAS 4):
    ``−Σ_i [C_ii / Σ_j |C_ij| + C_ii / Σ_j |C_ji|]``, summed over the d dimensions.

    Each dimension's correlation with its counterpart as a share of its row's and its column's total
    correlation; the minimum −2d means every dimension correlates only with its counterpart. The
    shares are invariant to scaling C, so the gradient grows as 1/|C|:
    ``∂/∂C_ii ≈ −2 / (d·mean|C|)``.
    corr [d, d] -> scalar in [−2d, 2d].
    """
    diag = corr.diagonal()
    magnitude = corr.abs()
    row_share = diag / magnitude.sum(1).clamp_min(eps)
    col_share = diag / magnitude.sum(0).clamp_min(eps)
    return -(row_share + col_share).sum()


def diag_share_dim_loss(corr: Tensor) -> Tensor:
    """Variant ``diag_share`` (reconstructed): :func:`diag_share_sum_dim_loss` × ``sg(mean_ij |C_ij|)``.

    Same minimiser and same gradient direction as the sum form; the detached factor (◇, a
    gradient-scale normalisation) cancels its 1/|C| growth, so ``∂/∂C_ii ≈ −2/d`` like
    :func:`barlow_dim_loss` at any d and any correlation level, and λ_dim means the same for both.
    −2 at C = I. corr [d, d] -> scalar.
    """
    return corr.abs().mean().detach() * diag_share_sum_dim_loss(corr)


def infonce_dim_loss(corr: Tensor, temperature: float) -> Tensor:
    """Variant ``dim_infonce`` (reconstructed): ``τ · ½[CE(C/τ, I) + CE(Cᵀ/τ, I)]``, cross-entropy over
    the rows and over the columns with the identity as target, each a mean over the d dimensions.

    ◇ Multiplied by τ (as SupCon scales by τ/τ_base): ``∂/∂C_ii = −(1 − p_ii)/d`` then does not
    depend on τ, half of :func:`barlow_dim_loss`'s at init. corr [d, d] -> scalar.
    """
    logits = corr / temperature
    target = torch.arange(corr.shape[0], device=corr.device)
    return temperature * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


# --- 3. spatial constraints on unmatched pairs ------------------------------------------------


def inter_delta(img: Tensor, txt: Tensor) -> Tensor:
    """``Δ^inter_ij = |D(v_i, t_j) − D(v_j, t_i)|`` with ``D = 1 − cos`` (METHODS.md DIAS 3,
    reconstructed form of the known inter-modality constraint). img, txt [B, d] -> [B, B], symmetric,
    zero diagonal."""
    dist = 1 - F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    return (dist - dist.t()).abs()


def intra_delta(img: Tensor, txt: Tensor) -> Tensor:
    """``Δ^intra_ij = |D(v_i, v_j) − D(t_i, t_j)|`` (METHODS.md DIAS 3, reconstructed form of the
    known intra-modality constraint). img, txt [B, d] -> [B, B], symmetric, zero diagonal."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    return ((1 - img @ img.t()) - (1 - txt @ txt.t())).abs()


def relation_strength(sims: Tensor) -> Tensor:
    """Pair strength ``r_ij = (s(i,j) + s(j,i)) / 2`` the sparse mask thresholds (reconstructed).

    Symmetrised because Δ^inter and Δ^intra are symmetric in (i, j). sims [B, B] -> [B, B].
    """
    return (sims + sims.t()) / 2


def row_stats(r: Tensor, valid: Tensor, eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Mean and population std of each row's valid entries: r [B, B], valid [B, B] bool ->
    ``μ``, ``σ`` [B, 1]. ``σ = sqrt(max(var, eps))``: finite gradient when a row is constant."""
    count = valid.sum(1, keepdim=True).clamp_min(1)
    mean = r.masked_fill(~valid, 0.0).sum(1, keepdim=True) / count
    var = (r - mean).masked_fill(~valid, 0.0).pow(2).sum(1, keepdim=True) / count
    return mean, var.clamp_min(eps).sqrt()


def sparse_mask(r: Tensor, valid: Tensor, k: Tensor | float, temperature: float,
                hard: bool = False) -> Tensor:
    """Sparse correlation mask over unmatched pairs (METHODS.md DIAS 4).

    Known: a learned soft threshold, based on each row's relations being roughly normal.
    Reconstructed: ``m_ij = sigmoid((r_ij − (μ_i + k σ_i)) / T)`` (``hard``: ``1[r_ij > μ_i + k σ_i]``),
    with ``μ_i, σ_i`` over row i's valid entries; invalid entries are 0.
    r [B, B], valid [B, B] bool (True = unmatched pair), k scalar -> m [B, B] in [0, 1].
    The soft mask is differentiable in ``k`` (and ``r``); the hard one is not.
    """
    mean, std = row_stats(r, valid)
    threshold = mean + k * std
    if hard:
        kept = (r > threshold).to(r.dtype)
    else:
        kept = torch.sigmoid((r - threshold) / temperature)
    return kept * valid.to(r.dtype)


def violation_mask(delta: Tensor, valid: Tensor, k: Tensor | float) -> Tensor:
    """``sparse_on: violation``, the public reimplementation's rule (METHODS.md DIAS 4): keep the pairs
    whose violation Δ itself exceeds ``μ + kσ`` of ``p = sigmoid(−Δ)``; hard mask.

    Known (METHODS.md): the rule, the statistics of sigmoid(−Δ) "over rows and columns", the hard mask.
    Reconstructed: ``μ, σ`` are each row's and each column's mean and population std of p over its
    valid entries, and a pair is kept only when Δ exceeds both its row's and its column's threshold.
    Note the units: Δ is compared with statistics of sigmoid(−Δ) ∈ (0.12, 0.5], so only pairs with
    Δ ≳ 0.45 can ever be kept.
    delta [B, B] (detach it: the mask has no gradient), valid [B, B] bool, k scalar -> {0, 1} [B, B].
    """
    p = torch.sigmoid(-delta)
    mu_row, sd_row = row_stats(p, valid)  # [B, 1]
    mu_col, sd_col = row_stats(p.t(), valid.t())  # [B, 1], one per column
    kept = (delta > mu_row + k * sd_row) & (delta > (mu_col + k * sd_col).t()) & valid
    return kept.to(delta.dtype)


def spatial_loss(delta: Tensor, weight: Tensor, eps: float = 1e-8) -> Tensor:
    """``Σ m_ij (Δ_ij)² / Σ m_ij``, the weighted mean over kept pairs (``sparse_on: relation``;
    L_inter and L_intra alike; the model multiplies it by L_align's batch scale).

    delta, weight [B, B] -> scalar; 0 when nothing is kept (the denominator is clamped).
    """
    return (weight * delta.pow(2)).sum() / weight.sum().clamp_min(eps)


def spatial_sum(delta: Tensor, mask: Tensor) -> Tensor:
    """``Σ (m_ij Δ_ij)²``, the sum over kept pairs (``sparse_on: violation``, the public
    reimplementation's normalisation). delta, mask [B, B] -> scalar."""
    return (mask * delta).pow(2).sum()
