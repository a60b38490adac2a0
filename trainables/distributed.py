"""Whole-batch statistics under DDP (METHODS.md "Rules for both methods").

Every loss term reads in-batch quantities: hardest negatives, correlations of dimensions, sparse
masks, KL between column distributions, quantiles. Under DDP each worker holds only its share of the
batch, so ``gather_batch`` concatenates the model's per-sample outputs from every worker, with
gradients (``torch.distributed.nn.functional.all_gather``), before the loss reads them. Every rank then
computes the loss of the whole batch; the backward of the gather sums each rank's gradient into the
rank that owns the sample, and DDP's average over ranks leaves exactly the gradient of the
single-process batch (``tests/test_distributed.py``).

Ranks may hold different numbers of samples (the last batch) and captions of different padded
lengths, so every dimension is padded to the largest across ranks before the gather and the padding
is cut off after it. A method's ``forward`` must therefore be per-sample; batch statistics belong in
``loss_terms``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.nn.functional import all_gather
from torch.nn.parallel import DistributedDataParallel


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def wrap_ddp(net: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP over ``net`` (``TrainStep``), without ``find_unused_parameters``: every method and switch
    builds only parameters its loss reaches (a disabled term's threshold is a buffer or absent, the
    text encoders have no pooler), so DDP need not walk the graph each step to find unused ones.
    ``tests/test_ddp_params.py`` holds every method and switch to that."""
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def rank_seed(seed: int, rank: int) -> int:
    """The seed a rank continues with once the model is built (identical weights everywhere): rank 0
    keeps ``seed``, so it draws as a one-process run does; every other rank draws its own noise and
    dropout from a seed derived from (seed, rank)."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**64, rank]).generate_state(1, np.uint64)[0])


def max_shape(tensor: Tensor) -> list[int]:
    """The largest size of every dimension across ranks."""
    shape = torch.tensor(tensor.shape, dtype=torch.int64, device=tensor.device)
    dist.all_reduce(shape, op=dist.ReduceOp.MAX)
    return shape.tolist()


def pad_to(tensor: Tensor, shape: list[int]) -> Tensor:
    """Zero-pad (False for bool) every dimension at its end up to ``shape``."""
    pad = []
    for have, want in reversed(list(zip(tensor.shape, shape))):
        pad += [0, want - have]
    if not any(pad):
        return tensor
    if tensor.dtype == torch.bool:
        return F.pad(tensor.to(torch.uint8), pad).bool()
    return F.pad(tensor, pad)


def gather_tensor(tensor: Tensor, sizes: list[int]) -> Tensor:
    """``tensor`` [b_r, ...] from every rank r -> [Σ b_r, ...] (other dims padded to the largest);
    differentiable for floating tensors."""
    target = max_shape(tensor)
    padded = pad_to(tensor, target)
    if padded.is_floating_point():
        with warnings.catch_warnings():
            # torch 2.13 marks it deprecated in favour of the private _functional_collectives, whose
            # gloo path fails on these shapes; this one is public, documented and tested here.
            warnings.simplefilter("ignore", FutureWarning)
            parts = all_gather(padded.contiguous())
    else:  # masks and ids carry no gradient
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def gather_batch(out: dict[str, Tensor], image_ids: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """The whole batch's per-sample outputs and image ids, in rank order (identity on one process)."""
    if world_size() == 1:
        return out, image_ids
    local = torch.tensor([image_ids.shape[0]], dtype=torch.int64, device=image_ids.device)
    sizes = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(sizes, local)
    sizes = [int(size) for size in sizes]
    gathered = {name: gather_tensor(value, sizes) for name, value in out.items()}
    return gathered, gather_tensor(image_ids, sizes)
