"""Time one optimisation step (forward + loss + backward + grad clip + AdamW) of DIAS against the base model.

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

import torch
import yaml

from benchmarks._steps import Stepper, add_step_args, step_inputs, time_rounds
from trainables.config import JobConfig
from trainables.methods import get_method


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
    add_step_args(parser, batch=128, dim=1024, text_encoder="minilm", steps=5)
    parser.add_argument("--dias", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the dias section, e.g. --dias dim_max_rows=null (repeatable)")
    args = parser.parse_args(argv)

    model_cfg, train_cfg, batch = step_inputs(args)
    dias_params = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.dias)}
    jobs = {"base": JobConfig(method="base", model=model_cfg, train=train_cfg),
            "dias": JobConfig(method="dias", model=model_cfg, train=train_cfg,
                              method_params=get_method("dias").parse_section(dias_params).model_dump())}
    steppers = {method: Stepper(job, args.image_dim) for method, job in jobs.items()}
    times = time_rounds(steppers, batch, args.steps, args.warmup)
    print(f"[text_encoder={args.text_encoder} batch={args.batch} d={args.dim} dias={dias_params} "
          f"threads={torch.get_num_threads()} steps={args.steps} (median)]")
    print(summarise(times, 0, "wall"))
    print(summarise(times, 1, "cpu "))
    return 0


if __name__ == "__main__":
    sys.exit(main())
