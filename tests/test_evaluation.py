"""trainables/evaluation.py against a naive per-query loop, plus the properties the metrics must have."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.evaluation import (
    DEFAULT_MEMORY_BUDGET,
    chunked_similarity,
    coco_5fold_metrics,
    encode_split,
    evaluate,
    evaluate_similarity,
    modality_gap,
    pessimistic_ranks,
    retrieval_metrics,
    rows_per_chunk,
    similarity_chunks,
    uniformity,
)

DIRECTIONS = ("i2t", "t2i")
# Both rank implementations must agree with the reference: the fused kernel is what CPU evaluation
# runs, the torch one what CUDA (and half precision) runs.
BACKENDS = ("fused", "torch")


# --------------------------------------------------------------------------------------------------
# The naive reference: one argsort per query, ties broken against the model
# --------------------------------------------------------------------------------------------------


def _ranked_position(scores: np.ndarray, is_gt: np.ndarray) -> int:
    """1-based position of the first ground truth when candidates are sorted by score, descending.

    Among equal scores negatives come first (pessimistic). NaN never helps: a NaN ground truth is
    treated as -inf, a NaN negative as +inf.
    """
    scores = np.where(np.isnan(scores), np.where(is_gt, -np.inf, np.inf), scores)
    order = np.lexsort((is_gt, -scores))  # last key is primary: score descending, then negatives first
    return int(np.flatnonzero(is_gt[order]).min()) + 1


def reference_ranks(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n_images, n_captions = sims.shape
    owner = np.arange(n_captions) // k
    i2t = np.array([_ranked_position(sims[i], owner == i) for i in range(n_images)])
    t2i = np.array([_ranked_position(sims[:, j], np.arange(n_images) == owner[j])
                    for j in range(n_captions)])
    return i2t, t2i


def reference_metrics(sims: np.ndarray, k: int) -> dict[str, float]:
    out = {}
    for name, ranks in zip(DIRECTIONS, reference_ranks(sims, k)):
        for at in (1, 5, 10):
            out[f"{name}_r{at}"] = 100.0 * np.mean(ranks <= at)
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)))
        out[f"{name}_meanr"] = float(np.mean(ranks))
    out["rsum"] = sum(out[f"{d}_r{at}"] for d in DIRECTIONS for at in (1, 5, 10))
    return out


def assert_metrics_equal(got: dict[str, float], want: dict[str, float]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-9), name


def _random_sims(n_images: int, k: int, seed: int, signal: float = 1.0) -> torch.Tensor:
    """Noise plus a planted signal on each caption's own image, so recalls are neither 0 nor 100."""
    g = torch.Generator().manual_seed(seed)
    sims = torch.randn(n_images, n_images * k, generator=g)
    owner = torch.arange(n_images * k) // k
    sims[owner, torch.arange(n_images * k)] += signal
    return sims


# --------------------------------------------------------------------------------------------------
# Agreement with the reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_images,k", [(1, 1), (1, 5), (3, 5), (12, 5), (40, 5), (13, 1), (60, 1)])
def test_matches_reference_on_random_matrices(n_images, k, backend):
    sims = _random_sims(n_images, k, seed=n_images * 10 + k)
    assert_metrics_equal(retrieval_metrics(sims, k, backend=backend), reference_metrics(sims.numpy(), k))
    i2t, t2i = pessimistic_ranks(sims, k, backend=backend)
    want_i2t, want_t2i = reference_ranks(sims.numpy(), k)
    np.testing.assert_array_equal(i2t.numpy(), want_i2t)
    np.testing.assert_array_equal(t2i.numpy(), want_t2i)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decimals", [0, 1])
@pytest.mark.parametrize("n_images,k", [(25, 5), (50, 1)])
def test_matches_reference_with_many_ties(n_images, k, decimals, backend):
    sims = torch.round(_random_sims(n_images, k, seed=7, signal=0.5) * 0.5, decimals=decimals)
    assert len(torch.unique(sims)) < sims.numel() / 20  # the test is only meaningful with many ties
    i2t, t2i = pessimistic_ranks(sims, k, backend=backend)
    want_i2t, want_t2i = reference_ranks(sims.numpy(), k)
    np.testing.assert_array_equal(i2t.numpy(), want_i2t)
    np.testing.assert_array_equal(t2i.numpy(), want_t2i)
    assert_metrics_equal(retrieval_metrics(sims, k, backend=backend), reference_metrics(sims.numpy(), k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_scores_never_help(backend):
    sims = _random_sims(20, 5, seed=3, signal=2.0)
    g = torch.Generator().manual_seed(4)
    sims[torch.rand(sims.shape, generator=g) < 0.1] = float("nan")
    sims[0] = float("nan")  # an image whose every score is NaN must rank last, not first
    i2t, t2i = pessimistic_ranks(sims, 5, backend=backend)
    want_i2t, want_t2i = reference_ranks(sims.numpy(), 5)
    np.testing.assert_array_equal(i2t.numpy(), want_i2t)
    np.testing.assert_array_equal(t2i.numpy(), want_t2i)
    assert i2t[0] == 100 - 5 + 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(dtype):
    sims = _random_sims(15, 5, seed=11).to(dtype)
    assert_metrics_equal(retrieval_metrics(sims, 5), reference_metrics(sims.float().double().numpy(), 5))


def test_fused_kernel_on_strided_views_and_thread_splits():
    # COCO folds hand the kernel non-contiguous views; row blocks per thread must not change counts.
    sims = torch.round(_random_sims(30, 5, seed=13), decimals=1)
    fold = sims[10:20, 50:100]
    assert not fold.is_contiguous()
    want_i2t, want_t2i = reference_ranks(fold.numpy(), 5)
    for threads in (1, 2, 3, 64):
        torch.set_num_threads(threads)
        try:
            i2t, t2i = pessimistic_ranks(fold, 5, backend="fused")
        finally:
            torch.set_num_threads(1)
        np.testing.assert_array_equal(i2t.numpy(), want_i2t)
        np.testing.assert_array_equal(t2i.numpy(), want_t2i)
    # A matrix that requires grad (an evaluation called outside no_grad) is fine too.
    i2t, _ = pessimistic_ranks(sims.clone().requires_grad_(), 5)
    np.testing.assert_array_equal(i2t.numpy(), reference_ranks(sims.numpy(), 5)[0])


def test_kernel_still_compiles_where_numba_cannot_cache(monkeypatch):
    import numba

    from trainables import rank_kernel

    real_njit = numba.njit

    def njit(**options):
        if options.get("cache"):  # what numba raises with a read-only install and no writable home
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return real_njit(**options)

    monkeypatch.setattr(numba, "njit", njit)
    assert rank_kernel._jit(lambda x: x + 1)(1) == 2


def test_backend_choice_errors():
    with pytest.raises(ValueError, match="unknown rank backend 'numpy'"):
        pessimistic_ranks(torch.zeros(2, 10), 5, backend="numpy")
    with pytest.raises(ValueError, match="float32/float64 CPU"):
        pessimistic_ranks(torch.zeros(2, 10, dtype=torch.float16), 5, backend="fused")


# --------------------------------------------------------------------------------------------------
# Known values
# --------------------------------------------------------------------------------------------------


def test_all_equal_matrix_scores_at_the_bottom():
    n_images, k = 100, 5
    metrics = retrieval_metrics(torch.zeros(n_images, n_images * k), k)
    # Every negative ties with the ground truth and counts against it.
    assert metrics["i2t_medr"] == metrics["i2t_meanr"] == n_images * k - k + 1
    assert metrics["t2i_medr"] == metrics["t2i_meanr"] == n_images
    assert metrics["rsum"] == 0.0


def test_collapsed_model_near_chance():
    # A collapsed model gives (nearly) equal scores: it must not look good.
    g = torch.Generator().manual_seed(0)
    sims = 0.9 + 1e-4 * torch.randn(200, 1000, generator=g)
    metrics = retrieval_metrics(sims, 5)
    chance_rsum = 100.0 * sum(min(1.0, 5 * at / 1000) + min(1.0, at / 200) for at in (1, 5, 10))
    assert metrics["rsum"] < 3 * chance_rsum


@pytest.mark.parametrize("k", [1, 5])
def test_perfect_matrix_scores_100(k):
    n_images = 30
    sims = (torch.arange(n_images)[:, None] == torch.arange(n_images * k)[None, :] // k).float()
    metrics = retrieval_metrics(sims, k)
    for d in DIRECTIONS:
        assert [metrics[f"{d}_r{at}"] for at in (1, 5, 10)] == [100.0] * 3
        assert metrics[f"{d}_medr"] == metrics[f"{d}_meanr"] == 1.0
    assert metrics["rsum"] == 600.0


def test_i2t_uses_the_best_ground_truth_and_ignores_ties_among_ground_truths():
    # Image 0: its 5 captions tie at 1.0, one negative at 0.5 -> rank 1 (ties among GTs are harmless).
    # Image 1: one GT at 0.9, the others far below; one negative at 0.95 -> rank 2.
    sims = torch.zeros(2, 10)
    sims[0, :5] = 1.0
    sims[0, 5] = 0.5
    sims[1, 5:] = -1.0
    sims[1, 7] = 0.9
    sims[1, 0] = 0.95
    i2t, _ = pessimistic_ranks(sims, 5)
    assert i2t.tolist() == [1, 2]


def test_median_rank_follows_numpy_median():
    # Ranks 1, 1, 4, 4 -> numpy median 2.5 -> medr 2 (the field's floor(median)), not torch's lower 1.
    sims = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                         [0.0, 1.0, 0.0, 0.0],
                         [2.0, 2.0, 1.0, 2.0],
                         [2.0, 2.0, 2.0, 1.0]])
    metrics = retrieval_metrics(sims, 1)
    assert metrics["i2t_medr"] == 2.0
    assert metrics["i2t_meanr"] == 2.5


def test_shape_errors():
    with pytest.raises(ValueError, match="captions_per_image=5"):
        retrieval_metrics(torch.zeros(4, 19), 5)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(torch.zeros(20), 5)


# --------------------------------------------------------------------------------------------------
# COCO 5-fold 1K vs 5K
# --------------------------------------------------------------------------------------------------


def test_fold_average_equals_per_fold_reference():
    fold, k, n_folds = 8, 5, 5
    sims = _random_sims(fold * n_folds, k, seed=21)
    folds = [reference_metrics(sims[f * fold:(f + 1) * fold, f * fold * k:(f + 1) * fold * k].numpy(), k)
             for f in range(n_folds)]
    want = {name: np.mean([m[name] for m in folds]) for name in folds[0]}
    assert_metrics_equal(coco_5fold_metrics(sims, k, fold_images=fold), want)


def test_full_matrix_is_never_easier_than_its_folds():
    # Each query's full-matrix negatives are a superset of its fold's: recall can only drop.
    sims = _random_sims(50, 5, seed=5, signal=2.5)
    metrics = evaluate_similarity(sims, 5, coco_folds=True, fold_images=10)
    for d in DIRECTIONS:
        for at in (1, 5, 10):
            assert metrics[f"{d}_r{at}"] <= metrics[f"1k_{d}_r{at}"]
        assert metrics[f"{d}_meanr"] >= metrics[f"1k_{d}_meanr"]
    assert metrics["rsum"] < metrics["1k_rsum"]


def test_distractors_outside_the_fold_only_hurt_the_full_matrix():
    fold, k = 4, 5
    n_images = fold * 5
    owner = torch.arange(n_images * k) // k
    sims = (torch.arange(n_images)[:, None] == owner[None, :]).float()  # perfect inside every fold
    fold_of_image = torch.arange(n_images) // fold
    # Every caption outside an image's fold outscores the image's own captions.
    sims[fold_of_image[:, None] != fold_of_image[owner][None, :]] = 2.0
    metrics = evaluate_similarity(sims, k, coco_folds=True, fold_images=fold)
    assert metrics["1k_rsum"] == 600.0
    assert metrics["i2t_r1"] == 0.0 and metrics["t2i_r1"] == 0.0
    assert metrics["i2t_medr"] == n_images * k - fold * k + 1  # behind every out-of-fold caption
    assert metrics["t2i_medr"] == n_images - fold + 1


def test_fold_size_must_divide_images():
    with pytest.raises(ValueError, match="folds of 1000"):
        coco_5fold_metrics(torch.zeros(1500, 7500), 5)
    assert "1k_rsum" not in evaluate_similarity(torch.zeros(10, 50), 5)


# --------------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [1, 3, 36, 37, 100])
def test_chunk_size_does_not_change_results(chunk_rows):
    sims = torch.round(_random_sims(37, 5, seed=9), decimals=1)
    chunked = retrieval_metrics(sims, 5, chunk_rows=chunk_rows, backend="torch")
    assert chunked == retrieval_metrics(sims, 5, backend="fused")
    # A 1-byte budget forces one-row chunks; results must not move either.
    assert retrieval_metrics(sims, 5, memory_budget=1, backend="torch") == chunked


def test_chunk_size_respects_memory_budget():
    rows = rows_per_chunk(25_000)
    assert rows * 25_000 * 5 <= DEFAULT_MEMORY_BUDGET < (rows + 1) * 25_000 * 5
    assert rows_per_chunk(10**12) == 1


def test_rank_scratch_allocations_stay_within_budget():
    from torch.profiler import ProfilerActivity, profile

    sims = torch.randn(400, 2000)  # comparing it all at once would need 4 MB of scratch
    budget = 256 * 2**10
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        retrieval_metrics(sims, 5, memory_budget=budget, backend="torch")
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest <= budget


def test_fused_kernel_scratch_is_per_column_not_per_element():
    import tracemalloc  # numpy reports its allocations to tracemalloc

    sims = torch.randn(400, 2000)  # 3.2 MB; the kernel keeps one int32 count per column and thread
    pessimistic_ranks(sims, 5, backend="fused")  # compile / load the kernel outside the measurement
    torch.set_num_threads(2)
    tracemalloc.start()
    try:
        pessimistic_ranks(sims, 5, backend="fused")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        torch.set_num_threads(1)
    # 2 threads x 2000 columns x 4 B = 16 KB of counts plus the thread pool's bookkeeping (~90 KB
    # measured); a bool per matrix element, as eager torch would make, is 800 KB.
    assert peak < 200 * 2**10


@pytest.mark.parametrize("chunk_rows", [1, 4, 11, 50])
def test_chunked_similarity_matches_matmul(chunk_rows):
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(11, 8, generator=g), torch.randn(55, 8, generator=g)
    sims = chunked_similarity(img, txt, chunk_rows=chunk_rows, device="cpu")
    assert sims.dtype == torch.float32 and sims.shape == (11, 55)
    torch.testing.assert_close(sims, img @ txt.T)
    starts = [start for start, _ in similarity_chunks(img, txt, chunk_rows=chunk_rows)]
    assert starts == list(range(0, 11, chunk_rows))


def test_chunked_similarity_custom_score_fn():
    g = torch.Generator().manual_seed(2)
    img, txt = torch.randn(6, 4, generator=g), torch.randn(30, 4, generator=g)

    def neg_sq_dist(a, b):
        return -torch.cdist(a, b).pow(2)

    sims = chunked_similarity(img, txt, chunk_rows=4, score_fn=neg_sq_dist)
    torch.testing.assert_close(sims, neg_sq_dist(img, txt))


# --------------------------------------------------------------------------------------------------
# Modality gap
# --------------------------------------------------------------------------------------------------


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_gap_zero_for_identical_embeddings():
    emb = _unit(50, 16, 0)
    gap = modality_gap(emb, emb.clone(), captions_per_image=1)
    assert gap["gap_centroid_dist"] == pytest.approx(0.0, abs=1e-7)
    assert gap["alignment"] == pytest.approx(0.0, abs=1e-7)
    assert gap["uniformity_img"] == pytest.approx(gap["uniformity_txt"])


def test_gap_grows_with_offset():
    emb = _unit(200, 16, 1)
    offset = torch.zeros(16)
    offset[0] = 1.0
    dists = [modality_gap(emb, emb + s * offset, 1)["gap_centroid_dist"] for s in (0.0, 0.5, 2.0)]
    aligns = [modality_gap(emb, emb + s * offset, 1)["alignment"] for s in (0.0, 0.5, 2.0)]
    assert dists[0] < dists[1] < dists[2]
    assert aligns[0] < aligns[1] < aligns[2]


def test_gap_values_match_definitions():
    img, txt = _unit(10, 8, 2), _unit(30, 8, 3)
    gap = modality_gap(img * 3.0, txt * 0.5, captions_per_image=3)  # scale must not matter
    assert gap["gap_centroid_dist"] == pytest.approx((img.mean(0) - txt.mean(0)).norm().item(), rel=1e-5)
    pairs = [((img[j // 3] - txt[j]) ** 2).sum().item() for j in range(30)]
    assert gap["alignment"] == pytest.approx(np.mean(pairs), rel=1e-5)
    naive = math.log(np.mean([math.exp(-2 * ((img[a] - img[b]) ** 2).sum().item())
                              for a in range(10) for b in range(10) if a != b]))
    assert gap["uniformity_img"] == pytest.approx(naive, rel=1e-6)


def test_uniformity_prefers_spread_embeddings():
    spread = _unit(300, 16, 4)
    collapsed = F.normalize(torch.ones(300, 16) + 0.01 * _unit(300, 16, 5), dim=1)
    assert uniformity(spread) < uniformity(collapsed) < 0.0
    assert uniformity(torch.ones(5, 3)) == pytest.approx(0.0)
    assert math.isnan(uniformity(torch.ones(1, 3)))  # no pairs: undefined, not a made-up number


def test_uniformity_subsample_is_reproducible():
    emb = _unit(3000, 8, 6)
    assert uniformity(emb, max_points=500) == uniformity(emb, max_points=500)
    assert uniformity(emb, max_points=500) == pytest.approx(uniformity(emb), abs=0.05)


def test_gap_shape_error():
    with pytest.raises(ValueError, match="captions_per_image=5"):
        modality_gap(torch.randn(4, 8), torch.randn(12, 8), 5)


# --------------------------------------------------------------------------------------------------
# Encoding a split with a model that implements the architecture.md contract
# --------------------------------------------------------------------------------------------------


class FakeITM(nn.Module):
    """Mean-pooled linear image encoder and bag-of-words text encoder; records its mode when called."""

    def __init__(self, image_dim: int = 6, vocab: int = 20, dim: int = 4):
        super().__init__()
        self.img_fc = nn.Linear(image_dim, dim)
        self.word = nn.Embedding(vocab, dim)
        self.dropout = nn.Dropout(0.5)  # would make embeddings random if eval mode were not set
        self.calls: list[tuple[bool, bool]] = []

    def _record(self):
        self.calls.append((self.training, torch.is_grad_enabled()))

    def encode_image(self, images, region_mask):
        self._record()
        tokens = self.dropout(self.img_fc(images))
        m = region_mask[..., None].float()
        emb = F.normalize((tokens * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)
        return {"tokens": tokens, "mask": region_mask, "emb": emb}

    def encode_text(self, input_ids, attention_mask):
        self._record()
        tokens = self.dropout(self.word(input_ids))
        m = attention_mask[..., None].float()
        emb = F.normalize((tokens * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)
        return {"tokens": tokens, "mask": attention_mask.bool(), "emb": emb}


def _loaders(n_images: int, k: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, 6, generator=g)
    region_mask = torch.rand(n_images, 3, generator=g) > 0.2
    ids = torch.randint(0, 20, (n_images * k, 5), generator=g)
    attn = (torch.rand(n_images * k, 5, generator=g) > 0.3).long()
    image_loader = [{"images": images[s:s + batch], "region_mask": region_mask[s:s + batch]}
                    for s in range(0, n_images, batch)]
    caption_loader = [{"input_ids": ids[s:s + batch], "attention_mask": attn[s:s + batch],
                       "image_ids": torch.arange(s, min(s + batch, n_images * k)) // k}
                      for s in range(0, n_images * k, batch)]
    return image_loader, caption_loader, (images, region_mask, ids, attn)


def test_encode_split_shapes_mode_and_values():
    model = FakeITM()
    model.train()
    model.word.eval()  # a mixed-mode model: both flags must come back as they were
    image_loader, caption_loader, (images, region_mask, ids, attn) = _loaders(7, 5, batch=3)
    img, txt = encode_split(model, image_loader, caption_loader, "cpu")
    assert img.shape == (7, 4) and txt.shape == (35, 4)
    assert img.dtype == txt.dtype == torch.float32 and img.device.type == "cpu"
    assert all(call == (False, False) for call in model.calls)  # eval mode, no grad, every batch
    assert len(model.calls) == 3 + 12
    assert model.training and model.img_fc.training and model.dropout.training
    assert not model.word.training
    model.eval()
    torch.testing.assert_close(img, model.encode_image(images, region_mask)["emb"].detach())
    torch.testing.assert_close(txt, model.encode_text(ids, attn)["emb"].detach())


def test_encode_split_restores_mode_on_error():
    model = FakeITM().train()
    with pytest.raises(KeyError):
        encode_split(model, [{"images": torch.zeros(1, 3, 6)}], [], "cpu")
    assert model.training and model.dropout.training


def test_evaluate_end_to_end():
    model = FakeITM()
    image_loader, caption_loader, _ = _loaders(20, 5, batch=8, seed=1)
    out = evaluate(model, image_loader, caption_loader, "cpu", captions_per_image=5,
                   coco_folds=True, fold_images=10)
    img, txt = encode_split(model, image_loader, caption_loader, "cpu")
    want = {**evaluate_similarity(img @ txt.T, 5, coco_folds=True, fold_images=10),
            **modality_gap(img, txt, 5)}
    for name, value in want.items():
        assert out[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert out.keys() == want.keys() and "1k_rsum" in out and "gap_centroid_dist" in out
    assert all(isinstance(v, float) for v in out.values())
