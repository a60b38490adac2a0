"""The fp32 island (trainables/precision.py): under bf16 autocast the encoders run in bf16, while
pooling, similarities, every method's loss terms and evaluation scores stay float32.

CPU autocast stands in for CUDA's: it lowers the same ops (linear, matmul) to bf16, so a missing
island shows up here as a bf16 dtype or a bf16-sized error.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_methods import IMAGE_DIM, job_for, random_batch
from trainables.evaluation import chunked_similarity, dot_score
from trainables.loop import TrainStep
from trainables.methods import METHODS, build_model
from trainables.pooling import GPO, MaxPool, MeanPool


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def unit_rows(n: int, d: int = 64, seed: int = 0) -> torch.Tensor:
    rows = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(rows, dim=1)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_loss_terms_get_float32_inputs_with_autocast_off(method):
    """TrainStep: the encoders really ran in bf16, yet ``loss_terms`` sees float32 tensors, runs with
    autocast off, and scores float32 similarities equal to the exact product."""
    torch.manual_seed(0)
    model = build_model(job_for(method), IMAGE_DIM)
    seen, sims = {}, []
    loss_terms, similarity = model.loss_terms, model.similarity

    def spy_loss_terms(out, image_ids, epoch):
        seen["dtypes"] = {k: v.dtype for k, v in out.items() if v.is_floating_point()}
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return loss_terms(out, image_ids, epoch)

    def spy_similarity(img, txt):
        result = similarity(img, txt)
        sims.append((img, txt, result))
        return result

    model.loss_terms, model.similarity = spy_loss_terms, spy_similarity
    batch = random_batch()
    with bf16_autocast():
        raw = model(batch)
        losses = TrainStep(model)(batch, 1)
    assert raw["img_tokens"].dtype == torch.bfloat16  # the encoders did run under autocast
    assert seen["autocast"] is False
    assert set(seen["dtypes"].values()) == {torch.float32}, seen["dtypes"]
    assert all(term.dtype == torch.float32 for term in losses.terms.values())
    assert sims, "loss_terms scored no similarities"
    for img, txt, result in sims:
        assert result.dtype == torch.float32
        torch.testing.assert_close(result, img.float() @ txt.float().t(), rtol=0, atol=1e-6)


def test_similarity_is_float32_under_autocast_and_finer_than_bf16():
    torch.manual_seed(0)
    model = build_model(job_for("base"), IMAGE_DIM)
    img, txt = unit_rows(32, seed=1), unit_rows(32, seed=2)
    exact = img.double() @ txt.double().t()
    with bf16_autocast():
        sims = model.similarity(img, txt)
        naive = img @ txt.t()  # what the model once computed here
    assert sims.dtype == torch.float32 and naive.dtype == torch.bfloat16
    assert (sims.double() - exact).abs().max() < 1e-6 < (naive.double() - exact).abs().max()


@pytest.mark.parametrize("pool", [MeanPool, MaxPool, GPO])
def test_pooling_is_float32_under_autocast(pool):
    """Same numbers as pooling the (bf16-valued) tokens in float32 without autocast: GPO's GRU and
    scoring linear included."""
    torch.manual_seed(0)
    module = pool()
    tokens = torch.randn(4, 7, 16).bfloat16()
    mask = torch.arange(7).unsqueeze(0) < torch.tensor([[7], [3], [1], [5]])
    with bf16_autocast():
        pooled = module(tokens, mask)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, module(tokens.float(), mask), rtol=0, atol=0)


def test_gpo_rank_weights_are_float32_under_autocast():
    torch.manual_seed(0)
    gpo = GPO()
    with bf16_autocast():
        weights = gpo.rank_weights(torch.tensor([2, 5, 1]), max_len=5)
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights, gpo.rank_weights(torch.tensor([2, 5, 1]), max_len=5), rtol=0, atol=0)


def test_dias_region_word_attention_is_float32_under_autocast():
    torch.manual_seed(0)
    model = build_model(job_for("dias"), IMAGE_DIM)
    with bf16_autocast():
        out = model(random_batch())
    assert out["dim_words_for_regions"].dtype == out["dim_regions_for_words"].dtype == torch.float32


@pytest.mark.parametrize("score_fn", [None, dot_score])
def test_evaluation_scores_float32_under_autocast(score_fn):
    """Even when the caller wraps evaluation in autocast, the ranks see float32 scores."""
    img, txt = unit_rows(20, seed=3), unit_rows(100, seed=4)
    with bf16_autocast():
        sims = chunked_similarity(img, txt, chunk_rows=8, score_fn=score_fn)
    exact = img.double() @ txt.double().t()
    assert (sims.double() - exact).abs().max() < 1e-6


def test_model_similarity_as_evaluation_score_is_float32_under_autocast():
    torch.manual_seed(0)
    model = build_model(job_for("dias"), IMAGE_DIM)
    img, txt = unit_rows(10, seed=5), unit_rows(50, seed=6)
    with bf16_autocast():
        sims = chunked_similarity(img, txt, chunk_rows=4, score_fn=model.similarity)
    assert (sims.double() - img.double() @ txt.double().t()).abs().max() < 1e-6
