"""The epoch loop, written once and Ray-free.

``fit(job, reporter)`` runs in a plain process (tests, benchmarks), inside each Ray Train worker
(multi-worker DDP) and directly inside a Tune trial (the one-worker path). Only the ``Reporter``
differs: it publishes per-epoch metrics with a checkpoint directory and returns the checkpoint to
resume from.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Protocol

import numpy as np
import torch

from trainables.config import JobConfig
from trainables.data import (
    PrecompSplit,
    build_eval_loaders,
    build_train_loader,
    frozen_text,
    check_eval_protocol,
    device_batch,
    set_epoch,
)
from trainables.data.precomp import FOLD_IMAGES
from trainables.data.text_cache import encoder_digest
from trainables.budget import term_budget
from trainables.device import autocast, choose_device, set_deterministic
from trainables.distributed import gather_batch, rank_seed, wrap_ddp
from trainables.errors import ITMError
from trainables.evaluation import RECALL_AT, evaluate
from trainables.malloc import keep_freed_memory
from trainables.methods import build_model
from trainables.model import ITMModel, LossOutput
from trainables.precision import full_precision, upcast_all
from trainables.step_stats import StepStats
from trainables.text_models import load_tokenizer

CHECKPOINT_FILE = "state.pt"
FROZEN_TEXT = "text_encoder.backbone."  # state-dict keys of the text backbone, left out when frozen
# Checkpoint selection: test metrics are reported at the epoch with the best validation rSum.
SELECT_METRIC = "rsum"
BEST_PREFIX, BEST_EPOCH = "best_", "best_epoch"
VAL_RETRIEVAL = (*(f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_AT), "rsum")
# Steps between two reads of the non-finite flag (each read syncs the host with the device).
LOG_EVERY = 100


class Reporter(Protocol):
    rank: int  # 0 is the process that evaluates and writes checkpoints
    world_size: int

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self) -> ContextManager[str | None]:
        """A private local copy of the newest checkpoint (None if there is none), valid inside the block."""
        ...


@dataclass
class Splits:
    train: PrecompSplit
    val: PrecompSplit
    test: PrecompSplit | None


def open_splits(job: JobConfig) -> Splits:
    data = job.data
    test = PrecompSplit(data.root, data.test_split, data.max_images) if data.test_split else None
    if test is not None:
        check_eval_protocol(data, test)  # now, not after the last epoch
    return Splits(PrecompSplit(data.root, data.train_split, data.max_images),
                  PrecompSplit(data.root, data.val_split, data.max_images), test)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class TrainStep(torch.nn.Module):
    """Forward + loss terms as one module call, so DDP sees every parameter a loss uses
    (temperatures, learnable thresholds) inside its forward. Under DDP the loss reads the whole
    batch: every worker's per-sample outputs are gathered first (``trainables/distributed.py``).

    The encoders run under the caller's autocast; ``loss_terms`` runs in the fp32 island
    (``trainables/precision.py``): autocast off, every half-precision output upcast to float32."""

    def __init__(self, model: ITMModel):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], epoch: int) -> LossOutput:
        out, image_ids = gather_batch(self.model(batch), batch["image_ids"])
        with full_precision(image_ids.device):
            return self.model.loss_terms(upcast_all(out), image_ids, epoch)


def fit(job: JobConfig, reporter: Reporter, device: torch.device | None = None) -> list[dict[str, float]]:
    """Train ``job`` for ``job.train.epochs`` epochs (resuming if the reporter has a checkpoint).

    Returns every epoch's metrics, resumed epochs included (validation metrics only on rank 0).
    """
    keep_freed_memory()  # a fresh Ray worker otherwise page-faults on every freed temporary (trainables/malloc.py)
    set_deterministic(job.train.deterministic)  # before any CUDA work: cuBLAS reads its workspace once
    seed_everything(job.train.seed)  # identical initial weights on every rank
    device = device or choose_device()  # under Ray: the device Ray assigned (trainables/ray_train.py)
    splits = open_splits(job)
    tokenizer = load_tokenizer(job.model.text_encoder)
    model = build_model(job, splits.train.feature_dim).to(device)
    if reporter.rank:  # the same weights, but each rank its own noise and dropout
        seed_everything(rank_seed(job.train.seed, reporter.rank))
    optimizer = torch.optim.AdamW(model.param_groups(job.train.lr, job.train.text_lr_scale),
                                  weight_decay=job.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(job.train.lr_decay_epochs),
                                                     gamma=job.train.lr_decay_gamma)
    with reporter.latest_checkpoint() as checkpoint_dir:
        history = restore(checkpoint_dir, model, optimizer, scheduler)
    net = TrainStep(model)
    if reporter.world_size > 1:
        net = wrap_ddp(net, device)
    # Only rank 0 evaluates: the other ranks neither build the validation loaders nor wait on the
    # validation split's text cache.
    eval_loaders = build_eval_loaders(job.data, splits.val, tokenizer, job.train.eval_batch_size,
                                      text=frozen_text(job, model.text_encoder.backbone, splits.val,
                                                       tokenizer, device)) if reporter.rank == 0 else None
    # train.batch_size is global: each of the world_size replicas takes its share.
    per_replica = max(job.train.batch_size // reporter.world_size, 2)
    loader = build_train_loader(job.data, splits.train, tokenizer, per_replica, seed=job.train.seed,
                                rank=reporter.rank, world_size=reporter.world_size,
                                pin_memory=device.type == "cuda",
                                text=frozen_text(job, model.text_encoder.backbone, splits.train,
                                                 tokenizer, device))
    for epoch in range(len(history), job.train.epochs):
        set_epoch(loader, epoch)
        started = time.perf_counter()
        metrics = train_one_epoch(net, model, loader, optimizer, job, epoch, device)
        metrics.update(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"],
                       epoch_time_s=time.perf_counter() - started)
        scheduler.step()
        if reporter.rank == 0:
            metrics.update(evaluate(model, *eval_loaders, device, splits.val.captions_per_image,
                                    score_fn=model.similarity))
            run_test = ((lambda: evaluate_test(model, job, splits.test, tokenizer, device))
                        if splits.test is not None else dict)
            metrics.update(checkpoint_metrics(metrics, history, epoch + 1 == job.train.epochs, run_test))
        history.append(finite(metrics))
        publish(reporter, history, model, optimizer, scheduler)
    return history


def evaluate_test(model: ITMModel, job: JobConfig, split: PrecompSplit, tokenizer, device) -> dict[str, float]:
    loaders = build_eval_loaders(job.data, split, tokenizer, job.train.eval_batch_size,
                                 text=frozen_text(job, model.text_encoder.backbone, split,
                                                  tokenizer, device))
    result = evaluate(model, *loaders, device, split.captions_per_image,
                      coco_folds=job.data.eval_protocol == "coco_5fold", fold_images=FOLD_IMAGES,
                      score_fn=model.similarity)
    return {f"test_{name}": value for name, value in result.items()}


def best_so_far(history: list[dict[str, float]]) -> dict[str, float]:
    """The ``best_*`` keys the newest epoch carries: the state of checkpoint selection. It lives in
    ``history`` (saved in every checkpoint), so a resumed run keeps the best epoch of its first part
    (a checkpoint from before these keys existed starts the selection afresh)."""
    last = history[-1] if history else {}
    return {key: value for key, value in last.items() if key.startswith(BEST_PREFIX)}


def best_metrics(epoch: int, metrics: dict[str, float], test: dict[str, float]) -> dict[str, float]:
    """``best_epoch``, the epoch's validation retrieval metrics as ``best_<m>`` and its test metrics
    as ``best_test_<m>`` (``best_test_1k_<m>`` on COCO's 5-fold protocol)."""
    return {BEST_EPOCH: float(epoch), **{BEST_PREFIX + key: metrics[key] for key in VAL_RETRIEVAL},
            **{BEST_PREFIX + key: value for key, value in test.items()}}


def checkpoint_metrics(metrics: dict[str, float], history: list[dict[str, float]], last: bool,
                       run_test: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Checkpoint selection after this epoch's validation (rank 0): when its validation rSum is
    strictly above every earlier epoch's (the first epoch always is), the test split is evaluated now
    and becomes the ``best_*`` keys; otherwise the earlier best epoch's keys are carried on. The
    last epoch also gets its own ``test_*`` (reusing the evaluation when it is the best one)."""
    best, test = best_so_far(history), None
    if metrics.get(SELECT_METRIC, -math.inf) > best.get(BEST_PREFIX + SELECT_METRIC, -math.inf):
        test = run_test()
        best = best_metrics(int(metrics["epoch"]), metrics, test)
    if last:
        return best | (test if test is not None else run_test())
    return best


def train_one_epoch(net, model: ITMModel, loader, optimizer, job: JobConfig, epoch: int, device) -> dict[str, float]:
    """One pass over ``loader`` (``net`` is ``TrainStep(model)``, maybe DDP-wrapped); returns the
    epoch's mean loss terms and stats.

    No host sync per step: the terms and stats are summed on the device (``StepStats``) and read
    once at the end; the non-finite flag is read every ``LOG_EVERY`` steps. A NaN/inf loss therefore
    raises ``NonFiniteLossError`` at the next read, not at its own step; the steps in between train
    on (NaN) parameters, but nothing of the epoch is reported or checkpointed (see ``StepStats``)."""
    net.train()
    stats = StepStats(epoch)
    budget: dict[str, float] = {}
    for step, batch in enumerate(loader):
        if job.train.max_steps_per_epoch and step >= job.train.max_steps_per_epoch:
            break
        batch = device_batch(batch, device, job.data.region_dropout)  # move, upcast, region dropout
        if step == 0:  # once per epoch: a few extra backward passes through the encoders
            budget = measure_budget(model, batch, job, epoch, device)
        with autocast(device, job.train.precision):
            losses = net(batch, epoch)
        total = losses.total()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
        optimizer.step()
        stats.add(total, losses)
        if stats.steps % LOG_EVERY == 0:
            stats.check()
    return stats.means() | budget | {"steps": stats.steps}


def measure_budget(model: ITMModel, batch: dict, job: JobConfig, epoch: int, device) -> dict[str, float]:
    """The term budget (``trainables/budget.py``) on this batch, through the unwrapped model so DDP's
    gradient hooks stay out of it. The RNG is forked and the buffers restored (e.g. CDDS's running
    quantiles), so measuring it leaves training unchanged."""
    devices = [device] if device.type == "cuda" else []
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    with torch.random.fork_rng(devices=devices), autocast(device, job.train.precision):
        losses = TrainStep(model)(batch, epoch)
        budget = term_budget(losses.terms, losses.weights, model.shared_parameters())
    with torch.no_grad():
        for name, value in model.named_buffers():
            value.copy_(buffers[name])
    return budget


def finite(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def publish(reporter: Reporter, history: list[dict[str, float]], model, optimizer, scheduler) -> None:
    """Report the newest epoch; rank 0 attaches a checkpoint (every rank must call ``report``).

    The checkpoint carries the metric history so a resumed run still returns every epoch.
    """
    if reporter.rank != 0:
        reporter.report(history[-1], None)
        return
    with tempfile.TemporaryDirectory(prefix="itm-ckpt-") as tmp:
        torch.save({**model_state(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "history": history}, os.path.join(tmp, CHECKPOINT_FILE))
        reporter.report(history[-1], tmp)


def model_state(model: ITMModel) -> dict:
    """``{"model": state_dict}`` for a checkpoint. A frozen text backbone is left out, and named by
    the digest of its weights (``frozen_text``): it never changes, ``fit`` rebuilds it identically
    (same source, same seed), and it would otherwise be most of every epoch's checkpoint (91 MB for
    MiniLM against a few MB of trained weights). ``load_model_state`` checks the digest."""
    state = model.state_dict()
    if not model.text_encoder.frozen:
        return {"model": state}
    kept = {key: value for key, value in state.items() if not key.startswith(FROZEN_TEXT)}
    return {"model": kept, "frozen_text": encoder_digest(model.text_encoder.backbone)}


def load_model_state(model: ITMModel, state: dict) -> None:
    """The inverse of ``model_state``: the frozen backbone built now must be the one trained with."""
    digest = state.get("frozen_text")
    if digest is None:
        model.load_state_dict(state["model"])
        return
    if not model.text_encoder.frozen or encoder_digest(model.text_encoder.backbone) != digest:
        raise ITMError("the checkpoint was trained with another frozen text encoder than the one built now "
                       "(model.text_encoder, model.freeze_text or the encoder's weights changed); "
                       "start a fresh run instead of resuming this one")
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    wrong = [key for key in missing if not key.startswith(FROZEN_TEXT)] + list(unexpected)
    if wrong:
        raise ITMError(f"the checkpoint does not fit this model: {', '.join(wrong[:5])} missing or unexpected")


def restore(checkpoint_dir: str | None, model, optimizer, scheduler) -> list[dict[str, float]]:
    """Load a checkpoint written by ``publish``; returns the history of the epochs it covers.

    Loaded onto the CPU: ``load_state_dict`` moves the weights and AdamW's moments to each parameter's
    device but leaves AdamW's ``step`` counters where they were loaded. On the GPU (the old
    ``map_location=device``), foreach AdamW reads every counter with ``.item()``: a host sync per
    parameter in every step after a resume."""
    if checkpoint_dir is None:
        return []
    state = torch.load(os.path.join(checkpoint_dir, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    load_model_state(model, state)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return list(state["history"])

