"""What the training-step benchmarks share (``train_step``, ``dias_step``, ``cdds_step``).

A random batch in the loader's contract, one method's model + optimiser that times a full step as
``trainables.loop`` runs it, the round-robin timing of several methods, and the common arguments.
"""

from __future__ import annotations

import argparse
import time

import torch

from trainables.config import JobConfig, ModelConfig, TrainConfig
from trainables.methods import build_model
from trainables.text_models import load_tokenizer


def build_batch(batch: int, regions: int, image_dim: int, vocab: int, seed: int = 0) -> dict:
    """A random batch in the loader's contract (docs/architecture.md); lengths 12..18 incl. CLS/SEP."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 19, (batch,), generator=gen)
    max_len = int(lengths.max())
    input_ids = torch.randint(1000, vocab, (batch, max_len), generator=gen)
    attention_mask = (torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return {"images": torch.randn(batch, regions, image_dim, generator=gen),
            "region_mask": torch.ones(batch, regions, dtype=torch.bool),
            "input_ids": input_ids * attention_mask, "attention_mask": attention_mask,
            "image_ids": torch.arange(batch)}


class Stepper:
    """One method's model and optimiser; ``step()`` runs and times one full training step
    (forward, loss terms, backward, grad clip, AdamW), as ``trainables.loop`` does."""

    def __init__(self, job: JobConfig, image_dim: int):
        torch.manual_seed(job.train.seed)
        self.model = build_model(job, image_dim).train()
        self.optimiser = torch.optim.AdamW(self.model.param_groups(job.train.lr, job.train.text_lr_scale),
                                           weight_decay=job.train.weight_decay)
        self.grad_clip = job.train.grad_clip

    def step(self, batch: dict) -> tuple[float, float]:
        """One step; returns (wall seconds, CPU seconds of this process)."""
        start, cpu_start = time.perf_counter(), time.process_time()
        out = self.model(batch)
        loss = self.model.loss_terms(out, batch["image_ids"], epoch=1).total()
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimiser.step()
        return time.perf_counter() - start, time.process_time() - cpu_start


def time_rounds(steppers: dict[str, Stepper], batch: dict, steps: int, warmup: int) -> dict[str, list]:
    """``{method: [(wall s, CPU s), ...]}`` of the timed steps. Each round steps every method once,
    in an order that rotates per round, so drifting machine load hits all methods alike."""
    names = list(steppers)
    times: dict[str, list] = {name: [] for name in names}
    for round_ in range(warmup + steps):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = steppers[name].step(batch)
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def add_step_args(parser: argparse.ArgumentParser, batch: int, dim: int, text_encoder: str, steps: int) -> None:
    """The arguments every step benchmark takes, with the script's own defaults."""
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--dim", type=int, default=dim, help="embed_dim d")
    parser.add_argument("--text-encoder", default=text_encoder, help="tiny | minilm | local checkpoint")
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per method (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--regions", type=int, default=12)
    parser.add_argument("--image-dim", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")


def step_inputs(args: argparse.Namespace, **model: object) -> tuple[ModelConfig, TrainConfig, dict]:
    """``(model config, train config, batch)`` from ``add_step_args``' arguments; sets the threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg = ModelConfig(embed_dim=args.dim, text_encoder=args.text_encoder, **model)
    batch = build_batch(args.batch, args.regions, args.image_dim, load_tokenizer(args.text_encoder).vocab_size)
    return model_cfg, TrainConfig(batch_size=args.batch), batch
