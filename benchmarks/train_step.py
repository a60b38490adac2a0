"""Training throughput (samples/s) of base, DIAS and CDDS at the same batch size and dimensions.

    python -m benchmarks.train_step                         # tiny text encoder, batch 64, d 512
    python -m benchmarks.train_step --text-encoder minilm   # MiniLM, fine-tuned (freeze_text: false)

One sample is one caption–image pair. A step is forward + loss terms + backward + grad clip + AdamW,
as in ``trainables.loop``; the batch is random, shaped like the synthetic data (12 regions x 256
dims, captions of 12–18 tokens; ``benchmarks._steps.build_batch``). Each method keeps its default
section (``METHODS.md``). Steps rotate between the methods round by round so that drifting machine
load hits all of them alike; the median step time gives samples/s = batch / median seconds, and
each method's ratio to base. CPU time (summed over this process's threads) is printed beside wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks._common import command, record
from benchmarks._steps import Stepper, add_step_args, step_inputs, time_rounds
from trainables.config import JobConfig, ModelConfig, TrainConfig
from trainables.methods import get_method

METHODS = ("base", "dias", "cdds")


def method_job(method: str, model: ModelConfig, train: TrainConfig) -> JobConfig:
    """A job for ``method`` with its section at the registered defaults."""
    section = get_method(method).parse_section({})
    return JobConfig(method=method, model=model, train=train,
                     method_params=section.model_dump() if section is not None else {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_args(parser, batch=64, dim=512, text_encoder="tiny", steps=8)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated registered methods")
    parser.add_argument("--record", default=None, help="append the figures (JSON lines) to this file")
    args = parser.parse_args(argv)

    model_cfg, train_cfg, batch = step_inputs(args)
    methods = args.methods.split(",")
    steppers = {name: Stepper(method_job(name, model_cfg, train_cfg), args.image_dim) for name in methods}
    times = time_rounds(steppers, batch, args.steps, args.warmup)

    print(f"[text_encoder={args.text_encoder} batch={args.batch} d={args.dim} threads={torch.get_num_threads()} "
          f"steps={args.steps} (median)]")
    wall = {name: statistics.median(t[0] for t in times[name]) for name in methods}
    cpu = {name: statistics.median(t[1] for t in times[name]) for name in methods}
    for name in methods:
        print(f"{name:5s} {wall[name] * 1000:8.1f} ms/step wall, {cpu[name] * 1000:8.1f} ms CPU, "
              f"{args.batch / wall[name]:8.1f} samples/s, {wall[name] / wall[methods[0]]:.2f}x {methods[0]}'s step")
    cmd = command("benchmarks.train_step", argv)
    figure = ", ".join(f"{name} {args.batch / wall[name]:.0f}" for name in methods)
    ratios = ", ".join(f"{name} {wall[name] / wall[methods[0]]:.2f}x" for name in methods[1:])
    record(args.record, f"training samples/s ({args.text_encoder} text encoder, batch {args.batch}, d {args.dim})",
           f"{figure} samples/s; step time vs {methods[0]}: {ratios}", cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
