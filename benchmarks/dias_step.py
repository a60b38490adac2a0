"""Time one optimisation step (forward + loss + backward + AdamW step) of DIAS against the base model.

    python -m benchmarks.dias_step                      # batch 128, d 1024, MiniLM text encoder
    python -m benchmarks.dias_step --text-encoder tiny  # the image side and DIAS's terms dominate

Image features are random, shaped like the synthetic data (12 regions x 256 dims); captions are random
token ids of 12-18 tokens (~15). Prints the median step time of each method and the ratio
DIAS / base (target: <= 1.25 with MiniLM), in wall-clock and in process CPU time. On a shared
machine pass ``--threads 1`` and read the CPU line: oversubscribed OpenMP threads and other
processes make wall-clock timings swing by several times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import yaml

from trainables.config import JobConfig, ModelConfig, TrainConfig
from trainables.methods import build_model, get_method
from trainables.text_models import load_tokenizer


def make_batch(batch: int, regions: int, image_dim: int, vocab: int, seed: int = 0) -> dict:
    """A random batch in the loader's contract (docs/architecture.md); lengths 12..18 incl. CLS/SEP."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 19, (batch,), generator=gen)
    max_len = int(lengths.max())
    input_ids = torch.randint(1000, vocab, (batch, max_len), generator=gen)
    attention_mask = (torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1)).long()
    input_ids = input_ids * attention_mask
    return {"images": torch.randn(batch, regions, image_dim, generator=gen),
            "region_mask": torch.ones(batch, regions, dtype=torch.bool),
            "input_ids": input_ids, "attention_mask": attention_mask,
            "image_ids": torch.arange(batch)}


class Stepper:
    """One method's model and optimiser; ``step()`` runs and times one full training step."""

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


def time_methods(steppers: dict[str, Stepper], batch: dict, steps: int,
                 warmup: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds of each timed step per method. Steps alternate between the methods (in a
    rotating order) so that drifting machine load affects both alike."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steppers}
    names = list(steppers)
    for round_ in range(warmup + steps):
        for name in names[round_ % 2:] + names[:round_ % 2]:
            seconds = steppers[name].step(batch)
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def summarise(times: dict[str, list[tuple[float, float]]], column: int, label: str) -> str:
    """One line: median ms/step of each method and the DIAS/base ratio for wall (0) or CPU (1) time."""
    base = [t[column] for t in times["base"]]
    dias = [t[column] for t in times["dias"]]
    ratio = statistics.median(dias) / statistics.median(base)
    # The per-round ratio is steadier on a loaded machine: both steps of a round share its load.
    paired = statistics.median(d / b for d, b in zip(dias, base))
    return (f"{label}: base {statistics.median(base) * 1000:8.1f} ms/step, "
            f"dias {statistics.median(dias) * 1000:8.1f} ms/step, ratio dias/base = {ratio:.3f} (median per-round ratio {paired:.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=1024, help="embed_dim d")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--text-encoder", default="minilm", help="minilm | tiny | local checkpoint")
    parser.add_argument("--regions", type=int, default=12)
    parser.add_argument("--image-dim", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--dias", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the dias section, e.g. --dias dim_max_rows=null (repeatable)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model_cfg = ModelConfig(embed_dim=args.dim, text_encoder=args.text_encoder)
    train_cfg = TrainConfig(batch_size=args.batch)
    batch = make_batch(args.batch, args.regions, args.image_dim, load_tokenizer(args.text_encoder).vocab_size)
    dias_params = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.dias)}
    jobs = {"base": JobConfig(method="base", model=model_cfg, train=train_cfg),
            "dias": JobConfig(method="dias", model=model_cfg, train=train_cfg,
                              method_params=get_method("dias").parse_section(dias_params).model_dump())}
    steppers = {method: Stepper(job, args.image_dim) for method, job in jobs.items()}
    times = time_methods(steppers, batch, args.steps, args.warmup)
    print(f"[text_encoder={args.text_encoder} batch={args.batch} d={args.dim} dias={dias_params} "
          f"threads={torch.get_num_threads()} steps={args.steps} (median)]")
    print(summarise(times, 0, "wall"))
    print(summarise(times, 1, "cpu "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
