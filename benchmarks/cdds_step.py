"""Time one optimisation step (forward + loss + backward + grad clip + AdamW) of CDDS against the base model.

    python -m benchmarks.cdds_step                      # batch 64, d 512, depth 2, z 4, MiniLM
    python -m benchmarks.cdds_step --text-encoder tiny  # the image side and CDDS's UNets dominate

Image features are random, shaped like the synthetic data (12 regions x 256 dims); captions are random
token ids of 12-18 tokens (~15). Each method runs in its own fresh process (spawn), so neither sees
the other's allocator state. Prints, per method, the median wall and CPU time of a step (CPU time
sums the process's threads; it is steadier than wall time on a shared machine), the ratios
CDDS / base, and the step's peak memory: peak resident set size during the warm-up and timed steps
minus the resident size just before them (Linux VmHWM, reset through /proc/self/clear_refs; where
that is unavailable, the ru_maxrss growth over the steps, a lower bound).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import sys

import torch

from benchmarks._common import status_kb
from benchmarks._steps import Stepper, add_step_args, step_inputs
from trainables.config import JobConfig


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return status_kb("VmHWM") is not None
    except OSError:
        return False


def measure(job: JobConfig, batch: dict, image_dim: int, steps: int, warmup: int, threads: int) -> dict:
    """Median step seconds over ``steps`` timed steps after ``warmup``, and the steps' peak memory (MB)."""
    if threads:
        torch.set_num_threads(threads)
    stepper = Stepper(job, image_dim)
    exact = _reset_peak()
    before_kb = status_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timed = [stepper.step(batch) for _ in range(warmup + steps)][warmup:]
    times, cpu_times = [wall for wall, _ in timed], [cpu for _, cpu in timed]
    peak_kb = status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in stepper.model.parameters() if p.requires_grad)
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu_times),
            "peak_mb": (peak_kb - before_kb) / 1024,
            "exact_peak": exact, "params_m": params / 1e6, "threads": torch.get_num_threads()}


def _child(queue, *args) -> None:
    queue.put(measure(*args))


def measure_in_fresh_process(*args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, *args))
    process.start()
    result = queue.get()
    process.join()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_args(parser, batch=64, dim=512, text_encoder="minilm", steps=5)
    parser.add_argument("--depth", type=int, default=2, help="cdds.unet_depth")
    parser.add_argument("--noise-groups", type=int, default=4, help="cdds.noise_groups z")
    parser.add_argument("--pooling", default="gpo", choices=("mean", "max", "gpo"))
    args = parser.parse_args(argv)

    model_cfg, train_cfg, batch = step_inputs(args, pooling=args.pooling)
    jobs = {"base": JobConfig(method="base", model=model_cfg, train=train_cfg),
            "cdds": JobConfig(method="cdds", model=model_cfg, train=train_cfg,
                              method_params={"unet_depth": args.depth, "noise_groups": args.noise_groups})}
    results = {}
    for name, job in jobs.items():
        results[name] = r = measure_in_fresh_process(job, batch, args.image_dim, args.steps, args.warmup,
                                                     args.threads)
        print(f"{name:5s} {r['seconds'] * 1000:9.1f} ms/step wall, {r['cpu_seconds'] * 1000:9.1f} ms CPU "
              f"(medians of {args.steps})  "
              f"peak +{r['peak_mb']:7.1f} MB{'' if r['exact_peak'] else ' (lower bound)'}  "
              f"{r['params_m']:6.2f}M trainable params")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    ratio = {key: results["cdds"][key] / results["base"][key] for key in ("seconds", "cpu_seconds")}
    print(f"ratio cdds/base = {ratio['seconds']:.2f} wall, {ratio['cpu_seconds']:.2f} CPU, "
          f"{results['cdds']['peak_mb'] / max(results['base']['peak_mb'], 1e-9):.2f} peak memory  "
          f"[text_encoder={args.text_encoder} batch={args.batch} d={args.dim} depth={args.depth} "
          f"z={args.noise_groups} pooling={args.pooling} threads={results['cdds']['threads']} load1={load:.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
