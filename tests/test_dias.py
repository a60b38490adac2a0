"""DIAS: each loss term as maths (properties, gradcheck, naive loop references) and the model's contract."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from trainables.budget import term_budget
from trainables.config import JobConfig, ModelConfig, TrainConfig
from trainables.errors import ConfigError
from trainables.loop import TrainStep
from trainables.methods import get_method
from trainables.methods.dias import DiasConfig
from trainables.methods.dias import losses as dl
from trainables.text_models import load_tokenizer

f64 = torch.float64
DIM_VARIANTS = ("barlow", "diag_share", "dim_infonce", "diag_share_sum")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: extra OpenMP threads only add overhead, and on a loaded machine
    spinning threads make each step 50x slower. Restored afterwards for other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- naive loop references (deliberately the slowest, most literal reading of METHODS.md) ------


def naive_cross_correlation(a, b, eps=1e-5):
    n, d = a.shape
    corr = torch.zeros(d, d, dtype=a.dtype)
    for i in range(d):
        x = a[:, i]
        za = (x - x.mean()) / math.sqrt(((x - x.mean()) ** 2).mean() + eps)
        for j in range(d):
            y = b[:, j]
            zb = (y - y.mean()) / math.sqrt(((y - y.mean()) ** 2).mean() + eps)
            corr[i, j] = sum(za[k] * zb[k] for k in range(n)) / n
    return corr


def naive_dim_loss(variant, corr, lambda_offdiag=0.05, tau=0.1):
    d = corr.shape[0]
    c = [[float(corr[i, j]) for j in range(d)] for i in range(d)]
    if variant == "barlow":
        return sum((1 - c[i][i]) ** 2 + lambda_offdiag * sum(c[i][j] ** 2 for j in range(d) if j != i)
                   for i in range(d)) / d
    if variant in ("diag_share", "diag_share_sum"):
        total = -sum(c[i][i] / sum(abs(c[i][j]) for j in range(d))
                     + c[i][i] / sum(abs(c[j][i]) for j in range(d)) for i in range(d))
        mean_abs = sum(abs(c[i][j]) for i in range(d) for j in range(d)) / d**2
        return total if variant == "diag_share_sum" else mean_abs * total
    rows = sum(-c[i][i] / tau + math.log(sum(math.exp(c[i][j] / tau) for j in range(d)))
               for i in range(d)) / d
    cols = sum(-c[i][i] / tau + math.log(sum(math.exp(c[j][i] / tau) for j in range(d)))
               for i in range(d)) / d
    return tau * (rows + cols) / 2


def naive_cos(x, y):
    return float(x @ y) / (float(x.norm()) * float(y.norm()))


def naive_deltas(img, txt):
    b = img.shape[0]
    inter, intra = torch.zeros(b, b, dtype=img.dtype), torch.zeros(b, b, dtype=img.dtype)
    for i in range(b):
        for j in range(b):
            inter[i, j] = abs((1 - naive_cos(img[i], txt[j])) - (1 - naive_cos(img[j], txt[i])))
            intra[i, j] = abs((1 - naive_cos(img[i], img[j])) - (1 - naive_cos(txt[i], txt[j])))
    return inter, intra


def naive_mask(r, valid, k, temperature, hard):
    b = r.shape[0]
    mask = torch.zeros_like(r)
    for i in range(b):
        values = [float(r[i, j]) for j in range(b) if valid[i, j]]
        if not values:
            continue
        mu = sum(values) / len(values)
        sigma = math.sqrt(max(sum((v - mu) ** 2 for v in values) / len(values), 1e-12))
        for j in range(b):
            if valid[i, j]:
                z = float(r[i, j]) - (mu + k * sigma)
                mask[i, j] = float(z > 0) if hard else 1 / (1 + math.exp(-z / temperature))
    return mask


def naive_spatial_loss(delta, weight):
    n = delta.shape[0]
    num = sum(float(weight[i, j]) * float(delta[i, j]) ** 2 for i in range(n) for j in range(n))
    return num / max(float(weight.sum()), 1e-8)


def naive_violation_mask(delta, valid, k):
    """Keep (i, j) when Δ_ij exceeds μ + kσ of sigmoid(−Δ) over row i's and column j's valid entries."""
    b = delta.shape[0]

    def threshold(values):
        p = [1 / (1 + math.exp(float(v))) for v in values]
        mu = sum(p) / len(p)
        return mu + k * math.sqrt(max(sum((x - mu) ** 2 for x in p) / len(p), 1e-12))

    rows = [threshold([delta[i, j] for j in range(b) if valid[i, j]]) for i in range(b)]
    cols = [threshold([delta[i, j] for i in range(b) if valid[i, j]]) for j in range(b)]
    mask = torch.zeros_like(delta)
    for i in range(b):
        for j in range(b):
            value = float(delta[i, j])
            mask[i, j] = float(bool(valid[i, j]) and value > rows[i] and value > cols[j])
    return mask


def naive_spatial_sum(delta, mask):
    n = delta.shape[0]
    return sum((float(mask[i, j]) * float(delta[i, j])) ** 2 for i in range(n) for j in range(n))


def naive_cross_attend(regions, region_mask, words, word_mask, tau):
    """Each region's softmax-weighted text context and each word's image context, one at a time."""
    b, r, _ = regions.shape
    words_for_regions = torch.zeros(regions.shape, dtype=regions.dtype)
    regions_for_words = torch.zeros(words.shape, dtype=regions.dtype)
    for n in range(b):
        valid_words = [w for w in range(words.shape[1]) if word_mask[n, w]]
        valid_regions = [i for i in range(r) if region_mask[n, i]]
        for i in range(r):
            logits = [naive_cos(regions[n, i], words[n, w]) / tau for w in valid_words]
            weights = torch.tensor(logits, dtype=regions.dtype).softmax(0)
            words_for_regions[n, i] = sum(wt * words[n, w] for wt, w in zip(weights, valid_words))
        for w in range(words.shape[1]):
            logits = [naive_cos(regions[n, i], words[n, w]) / tau for i in valid_regions]
            weights = torch.tensor(logits, dtype=regions.dtype).softmax(0)
            regions_for_words[n, w] = sum(wt * regions[n, i] for wt, i in zip(weights, valid_regions))
    return words_for_regions, regions_for_words


def random_tokens(b=3, r=4, l=5, d=6, dtype=f64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    regions = torch.randn(b, r, d, generator=gen, dtype=dtype)
    words = torch.randn(b, l, d, generator=gen, dtype=dtype)
    region_mask = torch.ones(b, r, dtype=torch.bool)
    region_mask[0, -1] = False
    word_mask = torch.arange(l).unsqueeze(0) < torch.tensor([[l], [l - 2], [2]][:b])
    return regions, region_mask, words, word_mask


def unmatched(b, ids=None):
    ids = torch.arange(b) if ids is None else torch.tensor(ids)
    return ids.unsqueeze(0) != ids.unsqueeze(1)


# --- local interaction and the rows of L_dim ---------------------------------------------------


def test_cross_attend_matches_loop():
    regions, region_mask, words, word_mask = random_tokens()
    fast = dl.cross_attend(regions, region_mask, words, word_mask, 0.3)
    slow = naive_cross_attend(regions, region_mask, words, word_mask, 0.3)
    torch.testing.assert_close(fast[0], slow[0])
    # padded regions of sample 0 are excluded from its words' image context
    torch.testing.assert_close(fast[1][word_mask], slow[1][word_mask])


def find_row(row, table, positions):
    """The one position p of ``positions`` with ``table[p] == row``."""
    hits = [p for p in positions if torch.equal(table[p], row)]
    assert len(hits) == 1, hits
    return hits[0]


@pytest.mark.parametrize("max_rows", [None, 6])
def test_dim_alignment_rows_match_loop_and_equalise_counts(max_rows):
    """Kept rows = ``count`` distinct valid regions (with their text context) then ``count`` distinct
    valid words (with their image context); the other rows are zero with weight 0."""
    regions, region_mask, words, word_mask = random_tokens()
    w4r, r4w = dl.cross_attend(regions, region_mask, words, word_mask, 0.3)
    m_v, m_t, keep = dl.dim_alignment_rows(regions, region_mask, words, word_mask, w4r, r4w, max_rows,
                                           torch.tensor(5))
    region_pos = [(n, i) for n in range(3) for i in range(4) if region_mask[n, i]]  # 11
    word_pos = [(n, w) for n in range(3) for w in range(5) if word_mask[n, w]]  # 10
    cap = (max_rows or 10**9) // 2
    count = min(len(region_pos), len(word_pos), cap)
    k_r, k_w = min(cap, 12), min(cap, 15)  # fixed row counts: all 3 x 4 region, 3 x 5 word slots
    assert m_v.shape == m_t.shape == (k_r + k_w, 6)
    expected_keep = [1.0] * count + [0.0] * (k_r - count) + [1.0] * count + [0.0] * (k_w - count)
    assert keep.tolist() == expected_keep
    picked_r = [find_row(m_v[i], regions, region_pos) for i in range(count)]
    picked_w = [find_row(m_t[k_r + i], words, word_pos) for i in range(count)]
    assert len(set(picked_r)) == len(set(picked_w)) == count
    torch.testing.assert_close(m_t[:count], torch.stack([w4r[p] for p in picked_r]))
    torch.testing.assert_close(m_v[k_r:k_r + count], torch.stack([r4w[p] for p in picked_w]))
    dropped = keep == 0
    assert m_v[dropped].eq(0).all() and m_t[dropped].eq(0).all()
    if max_rows is None:  # the fewer kind (words) is used whole
        assert set(picked_w) == set(word_pos)


def test_padding_rows_never_reach_the_rows_of_l_dim():
    """A NaN in a padded token stays out of M_V, M_T and C (as when the rows were gathered)."""
    regions, region_mask, words, word_mask = random_tokens()
    w4r, r4w = dl.cross_attend(regions, region_mask, words, word_mask, 0.3)
    regions[0, -1] = float("nan")  # region_mask[0, -1] is False
    words[2, -1] = float("inf")  # word_mask[2, -1] is False
    m_v, m_t, keep = dl.dim_alignment_rows(regions, region_mask, words, word_mask, w4r, r4w, None,
                                           torch.tensor(0))
    assert torch.isfinite(dl.cross_correlation(m_v, m_t, keep)).all()


def test_row_picks_are_reproducible_random_subsets_of_the_valid_positions():
    valid = torch.rand(20, generator=torch.Generator().manual_seed(0)) > 0.3
    positions = set(valid.nonzero().squeeze(1).tolist())
    picks = [dl.pick_valid(valid, dl.random_keys(torch.tensor(seed), 20), 20) for seed in range(400)]
    for pick in picks:  # every valid position, before every invalid one
        assert set(pick[:len(positions)].tolist()) == positions and sorted(pick.tolist()) == list(range(20))
    firsts = torch.stack([pick[:4] for pick in picks])  # the subsets of 4 that a cap of 4 would keep
    counts = torch.bincount(firsts.flatten(), minlength=20).float()
    expected = 400 * 4 / len(positions)
    assert counts[~valid].eq(0).all() and (counts[valid] - expected).abs().max() < 0.35 * expected
    assert len({tuple(p.tolist()) for p in firsts}) > 300  # seeds give different subsets
    same = dl.pick_valid(valid, dl.random_keys(torch.tensor(7), 20), 20)
    assert torch.equal(same, picks[7])  # a function of the seed: every DDP rank draws the same rows
    assert not torch.equal(dl.random_keys(torch.tensor(7), 20, salt=1), dl.random_keys(torch.tensor(7), 20))


def test_batch_seed_depends_on_the_ids_and_their_order():
    ids = torch.tensor([4, 8, 15, 16, 23, 42])
    assert torch.equal(dl.batch_seed(ids), dl.batch_seed(ids.clone()))
    others = [ids + 1, ids.flip(0), ids[:-1], torch.tensor([4, 8, 15, 16, 23, 43])]
    assert len({int(dl.batch_seed(ids))} | {int(dl.batch_seed(other)) for other in others}) == 5


def test_every_region_slot_enters_dim_rows():
    """Batch 128 x 36 regions, 512 rows per kind: an even stride of 9 picked only slots 0, 9, 18, 27."""
    b, r, d = 128, 36, 2
    slot = torch.arange(r, dtype=torch.float32).expand(b, r)
    regions = torch.stack([slot, torch.zeros(b, r)], dim=-1)  # feature 0 = the region's slot
    region_mask, word_mask = torch.ones(b, r, dtype=torch.bool), torch.ones(b, 12, dtype=torch.bool)
    words = torch.zeros(b, 12, d)
    m_v, _, keep = dl.dim_alignment_rows(regions, region_mask, words, word_mask, torch.zeros(b, r, d),
                                         torch.zeros(b, 12, d), max_rows=1024, seed=torch.tensor(0))
    assert keep[:512].eq(1).all()
    slots = m_v[:512, 0].long()
    assert len(slots) == 512 and set(slots.tolist()) == set(range(r))


def test_cross_correlation_matches_loop():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 4, generator=gen, dtype=f64) + 3, torch.randn(7, 4, generator=gen, dtype=f64) - 2
    torch.testing.assert_close(dl.cross_correlation(a, b), naive_cross_correlation(a, b))


def test_weighted_cross_correlation_is_that_of_the_kept_rows_alone():
    """The fixed-shape form (0/1 row weights) against the correlation of the gathered kept rows."""
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(9, 4, generator=gen, dtype=f64), torch.randn(9, 4, generator=gen, dtype=f64)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1], dtype=f64)
    a[keep == 0], b[keep == 0] = 1e3, -1e3  # the dropped rows' values must not matter
    kept = keep == 1
    torch.testing.assert_close(dl.cross_correlation(a, b, keep), naive_cross_correlation(a[kept], b[kept]))
    torch.testing.assert_close(dl.cross_correlation(a, b, torch.ones(9, dtype=f64)), dl.cross_correlation(a, b))


def test_cross_correlation_float32_is_accurate_with_offset_columns():
    # A raw-moment form would cancel E[xy] - E[x]E[y]; check float32 stays close with |mean| = 5 std.
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(512, 64, generator=gen, dtype=f64) + 5
    b = 0.5 * a + torch.randn(512, 64, generator=gen, dtype=f64) - 5
    exact = dl.cross_correlation(a, b)
    torch.testing.assert_close(dl.cross_correlation(a.float(), b.float()).double(), exact, atol=1e-4, rtol=0)


# --- L_dim ---------------------------------------------------------------------------------


def dim_loss(variant, corr, tau=0.1):
    if variant == "barlow":
        return dl.barlow_dim_loss(corr, 0.05)
    if variant == "diag_share":
        return dl.diag_share_dim_loss(corr)
    if variant == "diag_share_sum":
        return dl.diag_share_sum_dim_loss(corr)
    return dl.infonce_dim_loss(corr, tau)


@pytest.mark.parametrize("variant", DIM_VARIANTS)
def test_dim_loss_lower_for_aligned_than_permuted_dimensions(variant):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(256, 16, generator=gen)
    perm = torch.roll(torch.arange(16), 1)  # a derangement: no dimension keeps its partner
    aligned = dim_loss(variant, dl.cross_correlation(a, a + 0.1 * torch.randn(256, 16, generator=gen)))
    permuted = dim_loss(variant, dl.cross_correlation(a, a[:, perm]))
    shuffled_rows = dim_loss(variant, dl.cross_correlation(a, a[torch.randperm(256, generator=gen)]))
    assert aligned < permuted and aligned < shuffled_rows


@pytest.mark.parametrize("variant", DIM_VARIANTS)
def test_dim_loss_matches_loop(variant):
    corr = torch.rand(6, 6, generator=torch.Generator().manual_seed(20), dtype=f64) * 2 - 1
    assert dim_loss(variant, corr).item() == pytest.approx(naive_dim_loss(variant, corr))


def test_dim_loss_values_at_identity_correlation():
    eye = torch.eye(5, dtype=f64)
    assert dl.barlow_dim_loss(eye, 1.0) == 0
    assert dl.barlow_dim_loss(torch.zeros(5, 5, dtype=f64), 1.0) == 1  # uncorrelated: (1 - 0)² per dim
    assert dl.diag_share_sum_dim_loss(eye) == -10  # −2 per dimension, summed
    assert dl.diag_share_dim_loss(eye).item() == pytest.approx(-2)  # mean|I| = 1/d
    assert dl.infonce_dim_loss(eye, 0.1) < dl.infonce_dim_loss(eye.flip(0), 0.1)
    # off-diagonal correlations cost λ_off each (divided by d)
    ones = torch.ones(5, 5, dtype=f64)
    assert dl.barlow_dim_loss(ones, 0.5).item() == pytest.approx(0.5 * 20 / 5)


def init_like_correlation(d, seed):
    """A correlation matrix as at init: weak (|C| ~ 0.03), slightly positive diagonal."""
    gen = torch.Generator().manual_seed(seed)
    corr = 0.03 * torch.randn(d, d, generator=gen, dtype=f64) + 0.02 * torch.eye(d, dtype=f64)
    return corr.requires_grad_()


def grad_norm(loss_fn, corr):
    (grad,) = torch.autograd.grad(loss_fn(corr), corr)
    return float(grad.norm())


@pytest.mark.parametrize("d", [64, 512])
def test_dim_variants_have_comparable_gradient_scales(d):
    """λ_dim means the same for barlow, diag_share and dim_infonce (within 3x) at any d; the literal
    sum form is not normalised and grows as 1/mean|C|."""
    corr = init_like_correlation(d, seed=21)
    barlow = grad_norm(lambda c: dl.barlow_dim_loss(c, 5e-3), corr)
    assert 2 / math.sqrt(d) * 0.9 < barlow < 2 / math.sqrt(d) * 1.1  # ∂/∂C_ii ≈ −2/d
    for variant in ("diag_share", "dim_infonce"):
        assert 1 / 3 < grad_norm(lambda c: dim_loss(variant, c), corr) / barlow < 3, variant
    assert grad_norm(dl.diag_share_sum_dim_loss, corr) / barlow > 10


def test_dim_infonce_gradient_does_not_depend_on_temperature():
    corr = init_like_correlation(128, seed=22)
    norms = [grad_norm(lambda c: dl.infonce_dim_loss(c, tau), corr) for tau in (0.05, 0.1, 0.5)]
    assert max(norms) / min(norms) < 1.3, norms


def test_diag_share_is_the_sum_form_times_detached_mean_magnitude():
    corr = init_like_correlation(16, seed=23)
    (normalised,) = torch.autograd.grad(dl.diag_share_dim_loss(corr), corr)
    (summed,) = torch.autograd.grad(dl.diag_share_sum_dim_loss(corr), corr)
    torch.testing.assert_close(normalised, corr.abs().mean().detach() * summed)


# --- spatial constraints and the sparse mask -----------------------------------------------


def test_deltas_match_loop():
    gen = torch.Generator().manual_seed(4)
    img, txt = torch.randn(5, 3, generator=gen, dtype=f64), torch.randn(5, 3, generator=gen, dtype=f64)
    inter, intra = naive_deltas(img, txt)
    torch.testing.assert_close(dl.inter_delta(img, txt), inter)
    torch.testing.assert_close(dl.intra_delta(img, txt), intra)


def test_spatial_terms_zero_when_distances_are_consistent_positive_otherwise():
    gen = torch.Generator().manual_seed(5)
    v = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen, dtype=f64), dim=-1)
    weight = unmatched(6).to(f64)
    assert dl.spatial_loss(dl.intra_delta(v, v), weight) == 0
    assert dl.spatial_loss(dl.inter_delta(v, v), weight) < 1e-28  # zero up to matmul rounding
    # a rotation keeps every intra-modal distance: L_intra stays 0, L_inter does not
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=f64))[0]
    assert dl.spatial_loss(dl.intra_delta(v, v @ rotation), weight) < 1e-28
    t = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen, dtype=f64), dim=-1)
    assert dl.spatial_loss(dl.inter_delta(v, t), weight) > 1e-4
    assert dl.spatial_loss(dl.intra_delta(v, t), weight) > 1e-4
    assert dl.spatial_loss(dl.inter_delta(v, v @ rotation), weight) > 1e-4


def test_spatial_loss_matches_loop_and_ignores_zero_weights():
    gen = torch.Generator().manual_seed(6)
    delta, weight = torch.rand(5, 5, generator=gen, dtype=f64), torch.rand(5, 5, generator=gen, dtype=f64)
    assert dl.spatial_loss(delta, weight).item() == pytest.approx(naive_spatial_loss(delta, weight))
    assert dl.spatial_loss(delta, torch.zeros_like(weight)) == 0


@pytest.mark.parametrize("hard", [False, True])
def test_sparse_mask_matches_loop(hard):
    gen = torch.Generator().manual_seed(7)
    r = torch.randn(6, 6, generator=gen, dtype=f64)
    valid = unmatched(6, [0, 1, 2, 2, 3, 4])  # captions 2 and 3 share an image
    fast = dl.sparse_mask(r, valid, 0.7, 0.2, hard=hard)
    slow = naive_mask(r, valid, 0.7, 0.2, hard)
    if hard:
        assert torch.equal(fast, slow)
    else:
        torch.testing.assert_close(fast, slow)
    assert fast[2, 3] == 0 and fast[3, 2] == 0 and fast.diagonal().eq(0).all()


def test_sparse_mask_keeps_the_upper_tail_at_mu_plus_k_sigma():
    gen = torch.Generator().manual_seed(8)
    r, valid, k = torch.randn(16, 16, generator=gen), unmatched(16), 1.0
    mu, sigma = dl.row_stats(r, valid)
    above = valid & (r > mu + k * sigma)
    below = valid & (r < mu + k * sigma)
    assert torch.equal(dl.sparse_mask(r, valid, k, 0.1, hard=True).bool(), above)
    soft = dl.sparse_mask(r, valid, k, 0.1)
    assert (soft[above] > 0.5).all() and (soft[below] < 0.5).all() and soft[~valid].eq(0).all()


@pytest.mark.parametrize("hard", [False, True])
def test_mask_density_decreases_as_k_increases(hard):
    gen = torch.Generator().manual_seed(9)
    r, valid = torch.randn(32, 32, generator=gen), unmatched(32)
    density = [float(dl.sparse_mask(r, valid, k, 0.1, hard=hard).sum() / valid.sum())
               for k in (0.0, 0.5, 1.0, 2.0)]
    assert all(a > b for a, b in zip(density, density[1:])), density


def test_soft_mask_passes_gradient_to_k():
    gen = torch.Generator().manual_seed(10)
    img, txt = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
    k = torch.tensor(1.0, requires_grad=True)
    r = dl.relation_strength(img @ txt.t())
    weight = dl.sparse_mask(r, unmatched(8), k, 0.1)
    dl.spatial_loss(dl.inter_delta(img, txt), weight).backward()
    assert k.grad is not None and k.grad.abs() > 0


def symmetric_delta(b, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.rand(b, b, generator=gen, dtype=f64)
    return (x + x.t()).fill_diagonal_(0)


@pytest.mark.parametrize("k", [0.0, 0.7])
def test_violation_mask_matches_loop(k):
    delta = symmetric_delta(7, seed=30)
    valid = unmatched(7, [0, 1, 2, 2, 3, 4, 5])
    fast = dl.violation_mask(delta, valid, k)
    assert torch.equal(fast, naive_violation_mask(delta, valid, k))
    assert fast.sum() > 0 and torch.equal(fast, fast.t()) and fast[~valid].eq(0).all()


def test_violation_mask_thinner_as_k_grows_and_compares_delta_with_sigmoid_units():
    delta, valid = symmetric_delta(24, seed=31), unmatched(24)
    kept = [float(dl.violation_mask(delta, valid, k).sum()) for k in (0.0, 0.5, 1.0, 2.0)]
    assert all(a >= b for a, b in zip(kept, kept[1:])) and kept[0] > kept[-1], kept
    # sigmoid(−Δ) >= 0.45 when Δ <= 0.2, so small violations are never kept however low k is
    assert dl.violation_mask(symmetric_delta(24, seed=32, scale=0.1), valid, 0.0).sum() == 0


def test_spatial_sum_matches_loop():
    delta, mask = symmetric_delta(5, seed=33), (symmetric_delta(5, seed=34) > 1).to(f64)
    assert dl.spatial_sum(delta, mask).item() == pytest.approx(naive_spatial_sum(delta, mask))
    assert dl.spatial_sum(delta, torch.zeros_like(mask)) == 0


def test_spatial_terms_in_the_two_normalisations():
    """relation: a weighted *mean* (does not grow when more pairs are kept); violation: a *sum*."""
    delta = torch.full((6, 6), 0.5, dtype=f64).fill_diagonal_(0)
    few, many = unmatched(6).to(f64) * 0, unmatched(6).to(f64)
    few[0, 1] = few[1, 0] = 1
    assert dl.spatial_loss(delta, few) == dl.spatial_loss(delta, many) == 0.25
    assert dl.spatial_sum(delta, few) == 2 * 0.25 and dl.spatial_sum(delta, many) == 30 * 0.25


# --- gradcheck (float64, small) ------------------------------------------------------------


def leaf(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64, requires_grad=True)


def test_gradcheck_cross_attend():
    _, region_mask, _, word_mask = random_tokens(b=2, r=3, l=4, d=5)
    regions, words = leaf(2, 3, 5, seed=11), leaf(2, 4, 5, seed=12)
    assert gradcheck(lambda r, w: dl.cross_attend(r, region_mask, w, word_mask, 0.5), (regions, words))


@pytest.mark.parametrize("variant", [v for v in DIM_VARIANTS if v != "diag_share"])
def test_gradcheck_dim_losses(variant):
    """``diag_share``'s detached factor is not differentiated by design: its gradient is checked
    against the sum form's in test_diag_share_is_the_sum_form_times_detached_mean_magnitude."""
    m_v, m_t = leaf(8, 5, seed=13), leaf(8, 5, seed=14)
    assert gradcheck(lambda a, b: dim_loss(variant, dl.cross_correlation(a, b)), (m_v, m_t))


@pytest.mark.parametrize("delta_fn", [dl.inter_delta, dl.intra_delta])
def test_gradcheck_spatial_terms(delta_fn):
    img, txt, k = leaf(4, 5, seed=15), leaf(4, 5, seed=16), torch.tensor(0.5, dtype=f64, requires_grad=True)
    valid = unmatched(4)

    def term(img, txt, k):
        weight = dl.sparse_mask(dl.relation_strength(img @ txt.t()), valid, k, 0.3)
        return dl.spatial_loss(delta_fn(img, txt), weight)

    assert gradcheck(term, (img, txt, k))


def test_gradcheck_violation_term():
    """The violation mask is constant (hard, from detached Δ); the sum is differentiable in both Δ."""
    img, txt = leaf(5, 4, seed=17), leaf(5, 4, seed=18)
    valid = unmatched(5)

    def term(img, txt):
        delta = dl.inter_delta(img, txt) + dl.intra_delta(img, txt)
        return dl.spatial_sum(delta, dl.violation_mask(delta.detach(), valid, 0.0))

    assert term(img, txt) > 0 and gradcheck(term, (img, txt))


# --- NaN guards ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", DIM_VARIANTS)
@pytest.mark.parametrize("hard", [False, True])
def test_all_identical_embeddings_give_finite_terms_and_gradients(variant, hard):
    img = torch.ones(4, 5, requires_grad=True)
    txt = torch.ones(4, 5, requires_grad=True)
    k = torch.tensor(1.0, requires_grad=True)
    corr = dl.cross_correlation(img, txt)  # constant columns: σ = 0
    weight = dl.sparse_mask(dl.relation_strength(img @ txt.t()), unmatched(4), k, 0.1, hard=hard)  # σ_i = 0
    total = dim_loss(variant, corr) + dl.spatial_loss(dl.inter_delta(img, txt), weight) + \
        dl.spatial_loss(dl.intra_delta(img, txt), weight)
    total.backward()
    assert torch.isfinite(total)
    assert all(torch.isfinite(t.grad).all() for t in (img, txt) if t.grad is not None)
    assert k.grad is None or torch.isfinite(k.grad)


# --- the model -----------------------------------------------------------------------------

IMAGE_DIM = 16


def make_model(loss="triplet", **params):
    spec = get_method("dias")
    job = JobConfig(method="dias", model=ModelConfig(text_encoder="tiny", embed_dim=32),
                    train=TrainConfig(loss=loss), method_params=spec.parse_section(params).model_dump())
    torch.manual_seed(0)
    return spec.build(job, IMAGE_DIM).eval()  # eval: no dropout, so two builds compare exactly


def build_batch(b=6, regions=5, length=9, seed=0, identical=False):
    gen = torch.Generator().manual_seed(seed)
    vocab = load_tokenizer("tiny").vocab_size
    lengths = torch.randint(3, length + 1, (b,), generator=gen)
    attention_mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    batch = {"images": torch.randn(b, regions, IMAGE_DIM, generator=gen),
             "region_mask": torch.rand(b, regions, generator=gen) > 0.2,
             "input_ids": torch.randint(1000, vocab, (b, length), generator=gen) * attention_mask,
             "attention_mask": attention_mask,
             "image_ids": torch.tensor([0, 1, 2, 2, 3, 4][:b])}
    batch["region_mask"][:, 0] = True
    if identical:  # every pair the same image and caption (ids still distinct): σ = 0 everywhere
        for key in ("images", "region_mask", "input_ids", "attention_mask"):
            batch[key] = batch[key][:1].expand_as(batch[key]).clone()
        batch["image_ids"] = torch.arange(b)
    return batch


def run(model, batch):
    out = model(batch)
    return out, model.loss_terms(out, batch["image_ids"], epoch=1)


def test_model_loss_finite_and_gradients_reach_every_parameter():
    model, batch = make_model(), build_batch()
    out, loss = run(model, batch)
    assert set(loss.terms) == {"align", "dim", "inter", "intra"}
    assert loss.weights == {"align": 1.0, "dim": 1.0, "inter": 20.0, "intra": 2.0}
    assert 0 < loss.stats["mask_density"] < 1 and loss.stats["sparsity_k"] == pytest.approx(1.0)
    total = loss.total()
    assert torch.isfinite(total)
    total.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.sparsity_k_logit.grad.abs() > 0


@pytest.mark.parametrize("loss,scale", [("triplet", 6), ("infonce", 1)])
@pytest.mark.parametrize("sparse_on", ["relation", "violation"])
def test_terms_are_the_pure_functions_times_the_batch_scale(loss, scale, sparse_on):
    """Each DIAS term = its pure function of the batch's tensors x B for the summed hinge, x 1 for InfoNCE."""
    model = make_model(loss, sparse_on=sparse_on, sparsity_k=0.0, sparsity_learnable=False)
    batch = build_batch()
    out, losses = run(model, batch)
    img, txt, ids = out["img_emb"], out["txt_emb"], batch["image_ids"]
    corr = dl.cross_correlation(*model.dim_rows(out, ids))
    expected_dim = scale * dl.barlow_dim_loss(corr, 5e-3).item()
    assert losses.terms["dim"].item() == pytest.approx(expected_dim, rel=1e-5)
    valid = unmatched(6, ids.tolist())
    for name, delta_fn in (("inter", dl.inter_delta), ("intra", dl.intra_delta)):
        delta = delta_fn(img, txt)
        if sparse_on == "relation":
            weight = dl.sparse_mask(dl.relation_strength(img @ txt.t()), valid, 0.0, 0.05)
            expected = dl.spatial_loss(delta, weight)
        else:
            expected = dl.spatial_sum(delta, dl.violation_mask(delta, valid, 0.0))
        assert losses.terms[name].item() == pytest.approx(scale * expected.item(), rel=1e-5, abs=1e-12)


def test_forward_is_per_sample_and_the_loss_reads_the_gathered_batch():
    """What DDP relies on (trainables/distributed.py): forward outputs of two halves, concatenated,
    are the whole batch's, and loss_terms on that concatenation is the whole batch's loss."""
    model, batch = make_model(), build_batch()
    whole = model(batch)
    halves = [model({k: v[sl] for k, v in batch.items()}) for sl in (slice(0, 4), slice(4, 6))]
    for key, value in whole.items():
        assert value.shape[0] == 6, key  # every output is per sample
        torch.testing.assert_close(torch.cat([h[key] for h in halves]), value, msg=key)
    gathered = {key: torch.cat([h[key] for h in halves]) for key in whole}
    ids = batch["image_ids"]
    for name, value in model.loss_terms(whole, ids, 1).terms.items():
        torch.testing.assert_close(model.loss_terms(gathered, ids, 1).terms[name], value, msg=name)


def test_dim_rows_use_every_slot_and_are_reproducible_per_batch():
    model = make_model()
    batch = build_batch(b=6, regions=5, length=3)  # fewer words than regions: regions are subsampled
    batch["region_mask"][:] = True
    out = model(batch)
    ids = batch["image_ids"]
    first = model.dim_rows(out, ids)[0]
    torch.testing.assert_close(model.dim_rows(out, ids)[0], first)  # same batch, same rows (every DDP rank)
    tokens = out["img_tokens"].reshape(-1, 32)
    slots = set()
    for shift in range(10):  # other batches (ids) draw other rows
        rows = model.dim_rows(out, ids + 10 * shift)[0]
        n_words = int(batch["attention_mask"].sum())
        picked = (rows[:n_words].unsqueeze(1) == tokens.unsqueeze(0)).all(-1).nonzero()[:, 1]
        slots |= {int(p) % 5 for p in picked}
    assert slots == set(range(5))


def test_spatial_terms_are_float32_under_bf16_autocast():
    """Δ and the mask statistics are computed in fp32 from the (bf16-produced) embeddings."""
    model, batch = make_model(), build_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, losses = run(model, batch)
    img, txt = out["img_emb"].float(), out["txt_emb"].float()
    ids = batch["image_ids"]
    weight = model.pair_weights(img, txt, ids)
    for name, delta_fn in (("inter", dl.inter_delta), ("intra", dl.intra_delta)):
        assert losses.terms[name].dtype == torch.float32
        expected = 6 * dl.spatial_loss(delta_fn(img, txt), weight)
        torch.testing.assert_close(losses.terms[name], expected, rtol=1e-5, atol=1e-9)


def test_retrieval_embeddings_are_per_modality():
    model, batch = make_model(), build_batch()
    out = model(batch)
    alone = model.encode_image(batch["images"], batch["region_mask"])["emb"]
    torch.testing.assert_close(out["img_emb"], alone)
    other = dict(batch, input_ids=batch["input_ids"].flip(0), attention_mask=batch["attention_mask"].flip(0))
    torch.testing.assert_close(model(other)["img_emb"], out["img_emb"])


def test_same_image_pairs_get_no_weight():
    model, batch = make_model(), build_batch()
    out = model(batch)
    weight = model.pair_weights(out["img_emb"], out["txt_emb"], batch["image_ids"])
    assert weight[2, 3] == 0 and weight[3, 2] == 0 and weight.diagonal().eq(0).all()


@pytest.mark.parametrize("switch,removed",
                         [("use_dim", {"dim"}), ("use_inter", {"inter"}), ("use_intra", {"intra"})])
def test_each_switch_removes_its_term(switch, removed):
    batch = build_batch()
    _, full = run(make_model(), batch)
    _, ablated = run(make_model(**{switch: False}), batch)
    assert set(ablated.terms) == set(full.terms) - removed
    expected = full.total() - sum(full.weights[name] * full.terms[name] for name in removed)
    torch.testing.assert_close(ablated.total(), expected)


def test_without_sparsity_every_unmatched_pair_counts():
    batch = build_batch()
    _, full = run(make_model(), batch)
    model = make_model(use_sparse=False)
    _, dense = run(model, batch)
    assert dense.stats["mask_density"] == 1.0 and set(dense.terms) == set(full.terms)
    for name in ("inter", "intra"):
        assert not torch.isclose(dense.terms[name], full.terms[name], rtol=1e-3)
    assert dense.total() != full.total()
    assert "sparsity_k" in dict(model.named_buffers())


def test_without_spatial_terms_only_loc_and_dim_remain():
    _, loss = run(make_model(use_inter=False, use_intra=False), build_batch())
    assert set(loss.terms) == {"align", "dim"} and "mask_density" not in loss.stats


def test_violation_rule_has_a_mask_per_term_and_a_fixed_k():
    model = make_model(sparse_on="violation", sparsity_k=0.0)
    _, loss = run(model, build_batch())
    assert "sparsity_k" in dict(model.named_buffers()) and "mask_density" not in loss.stats
    assert {"mask_density_inter", "mask_density_intra"} <= set(loss.stats)


@pytest.mark.parametrize("params,learnable", [({}, True), ({"sparsity_learnable": False}, False),
                                              ({"sparsity_mode": "hard"}, False),
                                              ({"sparse_on": "violation"}, False)])
def test_k_is_a_parameter_only_when_learnable(params, learnable):
    model = make_model(**params)
    assert ("sparsity_k_logit" in dict(model.named_parameters())) is learnable
    assert ("sparsity_k" in dict(model.named_buffers())) is not learnable
    assert float(model.threshold_k().detach()) == pytest.approx(1.0)


# --- the bounded learnable k ----------------------------------------------------------------


def k_optimizer(model, lr=5e-4):
    """AdamW over k's own param group as ``fit`` builds it (θ at lr × sparsity_lr_scale, no decay)."""
    return torch.optim.AdamW([g for g in model.param_groups(lr, 0.1) if g["name"] == "sparsity_k"],
                             weight_decay=0.01)


def test_k_has_its_own_param_group_at_a_reduced_lr_without_decay():
    model = make_model(sparsity_lr_scale=0.1)
    groups = {g["name"]: g for g in model.param_groups(5e-4, 0.1)}
    assert groups["sparsity_k"]["params"] == [model.sparsity_k_logit]
    assert groups["sparsity_k"]["lr"] == pytest.approx(5e-5) and groups["sparsity_k"]["weight_decay"] == 0
    others = [p for name, g in groups.items() if name != "sparsity_k" for p in g["params"]]
    assert all(p is not model.sparsity_k_logit for p in others)
    assert len(others) + 1 == len([p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("k0", [0.0, 1.0, 4.9])
def test_k_never_leaves_its_range_under_a_relentless_gradient(k0):
    """AdamW moves θ by ≈ lr per step whatever the gradient: an unbounded k would walk off."""
    for direction in (1.0, -1.0):
        model = make_model(sparsity_k=k0)
        optimizer = k_optimizer(model, lr=0.3)  # θ's lr 3e-2: 1000 steps could move θ by ~30
        for _ in range(1000):
            model.sparsity_k_logit.grad = None
            (direction * model.threshold_k()).backward()
            optimizer.step()
            assert 0.0 <= float(model.threshold_k().detach()) <= 5.0
        bound = 0.0 if direction > 0 else 5.0
        assert float(model.threshold_k().detach()) == pytest.approx(bound, abs=0.05)


def push_k(model, optimizer, steps, grad):
    for _ in range(steps):
        model.sparsity_k_logit.grad = grad() if callable(grad) else torch.tensor(grad)
        optimizer.step()
    return float(model.threshold_k().detach())


def test_k_stays_near_its_init_without_gradient_signal():
    """At train.lr 5e-4 (θ at 5e-5): no gradient leaves k unchanged, zero-mean noise barely moves it,
    and even 2000 steps of one-signed gradient move it by < 0.1 (an unbounded k at lr 5e-4: by 1.0)."""
    model = make_model(sparsity_k=1.0)
    assert push_k(model, k_optimizer(model), 100, 0.0) == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(0)
    model = make_model(sparsity_k=1.0)
    assert abs(push_k(model, k_optimizer(model), 2000, lambda: torch.randn((), generator=gen)) - 1.0) < 0.02
    model = make_model(sparsity_k=1.0)
    assert abs(push_k(model, k_optimizer(model), 2000, -1.0) - 1.0) < 0.1


# --- the term budget -----------------------------------------------------------------------


def test_every_weighted_term_has_a_share_between_1_and_80_percent_at_the_defaults():
    """METHODS.md "Rules for both methods": a fresh model, shipped defaults, batch 32 of 12 regions,
    post-warm-up loss (docs/methods.md "Term budget" has the numbers for other sizes and after training)."""
    gen = torch.Generator().manual_seed(0)
    b, r, length = 32, 12, 10
    batch = {"images": torch.randn(b, r, 32, generator=gen),
             "region_mask": torch.ones(b, r, dtype=torch.bool),
             "input_ids": torch.randint(0, 100, (b, length), generator=gen),
             "attention_mask": torch.ones(b, length, dtype=torch.long), "image_ids": torch.arange(b)}
    torch.manual_seed(0)
    job = JobConfig(method="dias", model=ModelConfig(text_encoder="tiny", embed_dim=64))
    model = get_method("dias").build(job, 32)
    losses = TrainStep(model)(batch, 1)
    shares = term_budget(losses.terms, losses.weights, model.shared_parameters())
    shares = {k.removeprefix("budget/"): v for k, v in shares.items() if k.startswith("budget/")}
    assert set(shares) == {"align", "dim", "inter", "intra"}
    assert all(0.01 <= share <= 0.80 for share in shares.values()), shares


@pytest.mark.parametrize("variant", DIM_VARIANTS)
@pytest.mark.parametrize("mode", ["soft", "hard", "violation"])
@pytest.mark.parametrize("batch", [build_batch(b=2), build_batch(identical=True)],
                         ids=["batch2", "identical"])
def test_no_nan_with_batch_of_two_or_identical_pairs(variant, mode, batch):
    params = {"sparse_on": "violation"} if mode == "violation" else {"sparsity_mode": mode}
    model = make_model(dim_loss=variant, **params).train()
    _, loss = run(model, batch)
    total = loss.total()
    total.backward()
    assert all(torch.isfinite(t) for t in loss.terms.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --- the study-file section ----------------------------------------------------------------


def test_section_defaults_and_validation():
    spec = get_method("dias")
    assert spec.parse_section({}) == DiasConfig()
    assert DiasConfig().lambda_dim == 1.0 and DiasConfig().dim_loss == "barlow"
    assert DiasConfig().sparse_on == "relation"
    for bad in ({"lambda_dim": -1}, {"dim_loss": "cosine"}, {"sparsity_mode": "topk"},
                {"mask_temperature": 0},
                {"sparsity_k": 9}, {"sparsity_k": 3, "sparsity_k_max": 2}, {"sparse_on": "both"},
                {"sparsity_lr_scale": 0}, {"lamda_dim": 1.0}):
        with pytest.raises(ConfigError):
            spec.parse_section(bad)
    assert set(spec.searchable) <= set(DiasConfig.model_fields)
    assert {"sparse_on", "sparsity_learnable"} <= set(spec.searchable)
    for row in spec.ablations:
        if row.method == "dias":
            spec.parse_section(row.overrides)
