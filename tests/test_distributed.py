"""Whole-batch statistics under DDP: the same 64 pairs as 1 process × 64 and as 2 gloo processes × 32
give equal loss terms and equal (DDP-averaged) gradients, for every registered method (in float64,
to 1e-7: the comparison is of the maths, not of float32 summation order). The same processes then
train the method's shipped studies under DDP without ``find_unused_parameters``
(``tests/test_ddp_params.py``).

The two halves are cut to their own longest caption, as the loader does, so the gather must also
pad captions to a common length. Models run in eval mode: dropout and CDDS's noise draw random
numbers per sample, which no split of the batch can reproduce; the loss itself is the training loss.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainables.config import JobConfig, ModelConfig, TrainConfig
from trainables.distributed import gather_batch, pad_to
from trainables.methods import METHODS, build_model

IMAGE_DIM, B, R, L = 16, 64, 6, 12


def job_for(method: str) -> JobConfig:
    spec = METHODS[method]
    params = spec.section().model_dump() if spec.section else {}
    return JobConfig(method=method, model=ModelConfig(text_encoder="tiny", embed_dim=32, pooling="gpo"),
                     train=TrainConfig(loss="triplet"), method_params=params)


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, L + 1, (B,), generator=g)
    lengths[: B // 2] = lengths[: B // 2].clamp_max(L - 3)  # the first half is shorter: padding differs
    attention_mask = (torch.arange(L) < lengths.unsqueeze(1)).long()
    region_mask = torch.rand(B, R, generator=g) > 0.2
    region_mask[:, 0] = True
    return {"images": torch.randn(B, R, IMAGE_DIM, generator=g), "region_mask": region_mask,
            "input_ids": torch.randint(1000, 2000, (B, L), generator=g) * attention_mask,
            "attention_mask": attention_mask, "image_ids": torch.arange(B) // 2 * 2 // 2}


def half(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    part = {k: v[rank * B // 2:(rank + 1) * B // 2] for k, v in batch.items()}
    longest = int(part["attention_mask"].sum(1).max())
    part["input_ids"], part["attention_mask"] = part["input_ids"][:, :longest], part["attention_mask"][:, :longest]
    return part


def terms_and_grads(method: str, batch: dict[str, torch.Tensor]) -> tuple[dict, list]:
    # float64: the comparison is of the maths; in float32 a few gradients of CDDS's per-column
    # thresholds differ by ~1e-4 with the order of summation over the two halves.
    torch.set_default_dtype(torch.float64)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    torch.manual_seed(0)
    model = build_model(job_for(method), IMAGE_DIM).eval()
    out, image_ids = gather_batch(model(batch), batch["image_ids"])
    torch.manual_seed(1)  # a loss that samples (e.g. L_dim's row subsample) draws the same on every rank
    losses = model.loss_terms(out, image_ids, epoch=1)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(losses.total(), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return {k: v.detach() for k, v in losses.terms.items()}, grads


def worker(rank: int, method: str, init_file: str, out_dir: str) -> None:
    from tests.test_ddp_params import train_shipped

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        terms, grads = terms_and_grads(method, half(global_batch(), rank))
        for grad in grads:  # what DDP does with every parameter's gradient
            dist.all_reduce(grad)
            grad /= 2
        # While the processes are up: DDP steps of the method's shipped studies (tests/test_ddp_params.py)
        shipped = train_shipped(method, rank)
        torch.save({"terms": terms, "grads": grads, "shipped": shipped},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", list(METHODS))
def test_two_workers_see_the_whole_batch(method, tmp_path):
    default = torch.get_default_dtype()
    try:
        compare_one_and_two_workers(method, tmp_path)
    finally:
        torch.set_default_dtype(default)


def compare_one_and_two_workers(method, tmp_path):
    from tests.test_ddp_params import check_shipped

    mp.spawn(worker, args=(method, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    check_shipped(method, [got["shipped"] for got in ranks])
    terms, grads = terms_and_grads(method, global_batch())
    for got in ranks:
        assert set(got["terms"]) == set(terms)
        for name, value in terms.items():
            torch.testing.assert_close(got["terms"][name], value, rtol=1e-9, atol=1e-10, msg=name)
        assert len(got["grads"]) == len(grads)
        for expected, actual in zip(grads, got["grads"]):
            torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-9)
    assert any(g.abs().sum() > 0 for g in grads)  # the comparison is not between zeros


def test_pad_to_pads_every_dimension_at_its_end():
    mask = torch.tensor([[True, False]])
    assert pad_to(mask, [2, 3]).tolist() == [[True, False, False], [False, False, False]]
    values = torch.ones(1, 2, 1)
    assert pad_to(values, [1, 4, 1]).sum() == 2 and pad_to(values, [1, 4, 1]).shape == (1, 4, 1)
    assert pad_to(values, [1, 2, 1]) is values


def test_one_process_is_the_identity():
    out = {"img_emb": torch.randn(3, 4)}
    ids = torch.arange(3)
    assert gather_batch(out, ids) == (out, ids)
