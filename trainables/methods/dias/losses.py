"""DIAS loss terms (METHODS.md "DIAS"), pure functions of tensors.

Notation as in METHODS.md: a batch of B matched pairs; regions ``[B, R, d]`` and words ``[B, L, d]``
with validity masks; ``img``, ``txt`` ``[B, d]`` are the pooled, l2-normalised global embeddings
``v_i``, ``t_i``. The paper's full text was not available, so every formula here is marked either
*known* (stated by the paper's abstract / figure captions) or *reconstructed* (our concrete choice).

No config objects, devices or logging in here: the model (``model.py`` beside this file) picks the
variant and the weights; the loop forms the weighted total.
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


def even_indices(count: int, n: int, device: torch.device) -> Tensor:
    """``n <= count`` evenly spaced positions in ``range(count)`` [n] int64 (deterministic, no RNG)."""
    return torch.arange(n, device=device) * count // max(n, 1)


def dim_alignment_rows(regions: Tensor, region_mask: Tensor, words: Tensor, word_mask: Tensor,
                       words_for_regions: Tensor, regions_for_words: Tensor,
                       max_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """The matrices ``M_V``, ``M_T`` [2N, d] whose columns L_dim aligns (METHODS.md DIAS 2).

    Known: L_dim works on the local embeddings, one row per token. Reconstructed: row n of ``M_V`` and
    row n of ``M_T`` describe the *same* token in both modalities — a region with its text context
    (``regions``, ``words_for_regions``) or an image context with its word (``regions_for_words``,
    ``words``) — so that a cross-correlation of columns is meaningful. The two token kinds are
    equalised in count (N = fewer of valid regions / valid words, capped at ``max_rows // 2``) by
    even subsampling over the flattened batch, so neither modality dominates the column statistics.
    """
    region_rows = region_mask.flatten().nonzero().squeeze(1)
    word_rows = word_mask.flatten().nonzero().squeeze(1)
    n = min(region_rows.numel(), word_rows.numel())
    if max_rows is not None:
        n = min(n, max_rows // 2)
    region_rows = region_rows[even_indices(region_rows.numel(), n, regions.device)]
    word_rows = word_rows[even_indices(word_rows.numel(), n, words.device)]
    d = regions.shape[-1]
    m_v = torch.cat([regions.reshape(-1, d)[region_rows], regions_for_words.reshape(-1, d)[word_rows]])
    m_t = torch.cat([words_for_regions.reshape(-1, d)[region_rows], words.reshape(-1, d)[word_rows]])
    return m_v, m_t


# --- 2. L_dim: dimension information alignment ------------------------------------------------


def cross_correlation(m_v: Tensor, m_t: Tensor, eps: float = 1e-5) -> Tensor:
    """[N, d] x [N, d] -> [d, d] cross-correlation of standardised columns (METHODS.md DIAS 2).

    ``C_ab = (1/N) Σ_n ẑ_v[n, a] ẑ_t[n, b]`` with columns standardised by their batch mean and
    population std (``sqrt(var + eps)``, the BatchNorm guard: constant columns give 0, not NaN).
    Without eps this is the Pearson correlation, i.e. the cosine of the centred, l2-normalised columns.
    Known: a cross-correlation of dimension vectors. Reconstructed: standardisation details.
    """
    # Same numbers as standardising the columns and multiplying, but formed from the raw moments:
    # the [N, d] inputs are read by one matmul and one var_mean each instead of being rewritten
    # twice (benchmarks/dias_step.py). Fine in float32 unless |column mean| >> column std.
    count = m_v.shape[0]
    var_v, mean_v = torch.var_mean(m_v, dim=0, correction=0)
    var_t, mean_t = torch.var_mean(m_t, dim=0, correction=0)
    cov = m_v.t() @ m_t / count - mean_v.unsqueeze(1) * mean_t.unsqueeze(0)  # [d, d]
    return cov / ((var_v + eps).sqrt().unsqueeze(1) * (var_t + eps).sqrt().unsqueeze(0))


def barlow_dim_loss(corr: Tensor, lambda_offdiag: float) -> Tensor:
    """Variant ``barlow`` (default, reconstructed): ``[Σ_i (1 − C_ii)² + λ_off Σ_{i≠j} C_ij²] / d``.

    Aligned dimensions correlate, the others decorrelate ("decorrelating non-corresponding
    dimensions", known). We divide METHODS.md's sum by d so λ_dim means the same at any embed_dim.
    corr [d, d] -> scalar.
    """
    diag = corr.diagonal()
    offdiag = corr.pow(2).sum() - diag.pow(2).sum()
    return ((1 - diag).pow(2).sum() + lambda_offdiag * offdiag) / corr.shape[0]


def diag_share_dim_loss(corr: Tensor, eps: float = 1e-8) -> Tensor:
    """Variant ``diag_share`` (reconstructed): ``−Σ_i [C_ii / Σ_j |C_ij| + C_ii / Σ_j |C_ji|] / d``.

    Each dimension's correlation with its counterpart as a share of its row's and its column's total
    correlation; the minimum −2 means every dimension correlates only with its counterpart.
    ``corr`` is :func:`cross_correlation`, which already is the correlation of l2-normalised centred
    columns. corr [d, d] -> scalar in [−2, 2].
    """
    diag = corr.diagonal()
    magnitude = corr.abs()
    row_share = diag / magnitude.sum(1).clamp_min(eps)
    col_share = diag / magnitude.sum(0).clamp_min(eps)
    return -(row_share + col_share).sum() / corr.shape[0]


def infonce_dim_loss(corr: Tensor, temperature: float) -> Tensor:
    """Variant ``dim_infonce`` (reconstructed): cross-entropy over the rows and over the columns of
    ``C / τ`` with the identity as target, averaged (already a mean over the d dimensions).
    corr [d, d] -> scalar."""
    logits = corr / temperature
    target = torch.arange(corr.shape[0], device=corr.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


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


def spatial_loss(delta: Tensor, weight: Tensor, eps: float = 1e-8) -> Tensor:
    """``L = Σ m_ij (Δ_ij)² / Σ m_ij`` (METHODS.md DIAS 4; L_inter and L_intra alike).

    delta, weight [B, B] -> scalar; 0 when nothing is kept (the denominator is clamped).
    """
    return (weight * delta.pow(2)).sum() / weight.sum().clamp_min(eps)
