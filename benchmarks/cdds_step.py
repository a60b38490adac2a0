"""Time one optimisation step (forward + loss + backward + grad clip + AdamW) of CDDS against the base
model, optionally against CDDS as it was at another git revision, and profile CDDS's step part by part.

    python -m benchmarks.cdds_step                      # batch 64, d 512, depth 2, z 4, MiniLM
    python -m benchmarks.cdds_step --text-encoder tiny  # the image side and CDDS's UNets dominate
    python -m benchmarks.cdds_step --compare 43b6656 --profile 3 --rounds 3   # before/after, one run

Image features are random, shaped like the synthetic data (12 regions x 256 dims); captions are random
token ids of 12-18 tokens (~15). Each arm runs in its own fresh process (spawn), so none sees another's
allocator state; ``--rounds`` repeats the arms in rotating order. Prints, per arm, the median wall and
CPU time of a step (CPU time sums the process's threads; it is steadier than wall time on a shared
machine), the ratios to base, and the step's peak memory: peak resident set size during the warm-up
and timed steps minus the resident size just before them (Linux VmHWM, reset through
/proc/self/clear_refs; where that is unavailable, the ru_maxrss growth over the steps, a lower bound).

``--compare REV`` adds the arm ``cdds@REV``: ``trainables/methods/cdds/`` of that revision (``git
archive``, read-only) overlays the working tree's in that arm's process; the rest of the code is the
working tree's. ``--profile N`` then profiles N more steps of every CDDS arm with ``torch.profiler``
and prints a part-by-part table (CPU ms, medians over the N steps). Parts are labelled from outside
(``record_function`` wrappers around named functions and modules, so the same labels apply to both
revisions); a backward op is charged to the part whose forward op created its autograd node
(``sequence_nr``); anything unlabelled is "other".
"""

from __future__ import annotations

import argparse
import functools
import io
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict

import torch

from benchmarks._common import ROOT, status_kb
from benchmarks._steps import Stepper, add_step_args, step_inputs
from trainables.config import JobConfig

CDDS_DIR = "trainables/methods/cdds"


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return status_kb("VmHWM") is not None
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Another revision's CDDS code
# ---------------------------------------------------------------------------------------------

def extract_revision(rev: str, into: str) -> str:
    """``trainables/methods/cdds/`` at git revision ``rev`` under ``into``; returns that directory."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, CDDS_DIR],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return os.path.join(into, CDDS_DIR)


def use_overlay(directory: str) -> None:
    """Load the CDDS submodules (model, unet, losses) from ``directory`` in this process; the package's
    ``__init__`` (registry entry) and ``config`` stay the working tree's."""
    import trainables.methods.cdds as package

    for name in ("model", "unet", "losses"):
        sys.modules.pop(f"{package.__name__}.{name}", None)
        package.__dict__.pop(name, None)
    package.__path__.insert(0, directory)


# ---------------------------------------------------------------------------------------------
# Part-by-part profile
# ---------------------------------------------------------------------------------------------

LOSS_FUNCTIONS = {  # trainables.methods.cdds.losses function -> part (absent names are skipped)
    "sort_columns": "column sort (shared)", "related_semantics": "related semantics (KL, W)",
    "related_weights": "related semantics (KL, W)", "related_semantics_of_tables": "related semantics (KL, W)",
    "resample_sorted": "related semantics (KL, W)", "distribution_sample": "quantile sampling",
    "sample_sorted": "quantile sampling", "modality_consistency_loss": "L_m",
}
MODEL_METHODS = {"update_quantiles": "running quantiles", "blend_quantiles": "running quantiles",
                 "completeness_term": "L_f, L_x", "stats": "stats",
                 "sample": "sampling glue (masking, pooling input)", "loss_terms": "losses glue"}
MODULES = {"image_encoder": "base: image encoder", "text_encoder": "base: text encoder",
           "image_pool": "pooling", "text_pool": "pooling", "align": "L_s (alignment loss)",
           "image_unet": "UNet glue", "text_unet": "UNet glue"}
UNET_PARTS = {"encode": "UNet encoder", "add_noise": "noise groups"}
DECODERS = {"semantic": "semantic decoder (z groups)", "modality": "modality decoder (z groups)"}
OTHER_FORWARD, OTHER_BACKWARD = "other (forward)", "other (backward, grad accumulation)"
OPTIMISER = "clip + AdamW"


def labelled(label: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(f"part::{label}"):
            return fn(*args, **kwargs)
    return wrapper


def label_parts(model: torch.nn.Module) -> None:
    """Wrap the named functions, methods and modules of one CDDS model in ``record_function`` labels."""
    from trainables.methods.cdds import losses

    for name, label in LOSS_FUNCTIONS.items():
        if hasattr(losses, name):
            setattr(losses, name, labelled(label, getattr(losses, name)))
    for name, label in MODEL_METHODS.items():
        if hasattr(model, name):
            setattr(model, name, labelled(label, getattr(model, name)))
    for name, label in MODULES.items():
        if hasattr(model, name):
            module = getattr(model, name)
            module.forward = labelled(label, module.forward)
    for side in ("image_unet", "text_unet"):
        unet = getattr(model, side, None)
        if unet is None:
            continue
        for name, label in UNET_PARTS.items():
            setattr(unet, name, labelled(label, getattr(unet, name)))
        for name, label in DECODERS.items():
            decoder = getattr(unet, name)
            if decoder is not None:
                decoder.forward = labelled(label, decoder.forward)


def innermost_label(event) -> str | None:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("part::"):
            return parent.name.removeprefix("part::")
        parent = parent.cpu_parent
    return None


def attribute(events) -> dict[str, list[float]]:
    """{part: [forward ms, backward ms]} of one profiled step. Forward: every top-level op (its
    parent, if any, is a label) goes to its innermost label. Backward: every autograd node goes to
    the part of the forward op with the same ``sequence_nr``."""
    parts: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    part_of_node = {}
    for event in events:
        if event.name.startswith("part::") or event.name.startswith("autograd::engine::evaluate_function"):
            continue
        if not _inside_backward(event):
            if event.sequence_nr >= 0 and event.sequence_nr not in part_of_node:
                part_of_node[event.sequence_nr] = innermost_label(event) or OTHER_FORWARD
            if event.cpu_parent is None or event.cpu_parent.name.startswith("part::"):
                parts[innermost_label(event) or OTHER_FORWARD][0] += event.cpu_time_total / 1000
    for event in events:
        if event.name.startswith("autograd::engine::evaluate_function"):
            part = part_of_node.get(event.sequence_nr, OTHER_BACKWARD)
            parts[part][1] += event.cpu_time_total / 1000
    return dict(parts)


def _inside_backward(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("autograd::engine::evaluate_function"):
            return True
        parent = parent.cpu_parent
    return False


def profile_steps(stepper: Stepper, batch: dict, steps: int) -> dict[str, list[float]]:
    """Median [forward ms, backward ms] per part over ``steps`` profiled steps (clip + AdamW as forward)."""
    label_parts(stepper.model)
    stepper.optimiser.step = labelled(OPTIMISER, stepper.optimiser.step)
    clip = torch.nn.utils.clip_grad_norm_
    torch.nn.utils.clip_grad_norm_ = labelled(OPTIMISER, clip)
    runs = []
    try:
        for _ in range(steps):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                stepper.step(batch)
            runs.append(attribute(prof.events()))
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    names = {name for run in runs for name in run}
    return {name: [statistics.median(run.get(name, [0.0, 0.0])[i] for run in runs) for i in (0, 1)]
            for name in names}


# ---------------------------------------------------------------------------------------------
# One arm in a fresh process
# ---------------------------------------------------------------------------------------------

def measure(job: JobConfig, batch: dict, image_dim: int, steps: int, warmup: int, threads: int,
            overlay: str | None = None, profile: int = 0) -> dict:
    """Median step seconds over ``steps`` timed steps after ``warmup``, the steps' peak memory (MB),
    and with ``profile`` the part-by-part medians of that many more (profiled) steps."""
    if threads:
        torch.set_num_threads(threads)
    if overlay:
        use_overlay(overlay)
    stepper = Stepper(job, image_dim)
    exact = _reset_peak()
    before_kb = status_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timed = [stepper.step(batch) for _ in range(warmup + steps)][warmup:]
    times, cpu_times = [wall for wall, _ in timed], [cpu for _, cpu in timed]
    peak_kb = status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    params = sum(p.numel() for p in stepper.model.parameters() if p.requires_grad)
    result = {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu_times),
              "peak_mb": (peak_kb - before_kb) / 1024, "exact_peak": exact, "params_m": params / 1e6,
              "threads": torch.get_num_threads()}
    if profile and job.method == "cdds":
        result["parts"] = profile_steps(stepper, batch, profile)
    return result


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


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def profile_table(parts: dict[str, dict[str, list[float]]], step_ms: dict[str, float]) -> str:
    """Markdown: one row per part, its forward + backward ms and share of the step per arm. The
    profiler's durations (wall time, inflated by profiling and by other processes) are rescaled so
    that each arm's parts sum to its timed median CPU step ``step_ms``."""
    arms = list(parts)
    scale = {arm: step_ms[arm] / sum(sum(v) for v in parts[arm].values()) for arm in arms}
    names = sorted({name for arm in arms for name in parts[arm]},
                   key=lambda name: -max(sum(parts[arm].get(name, [0, 0])) for arm in arms))
    lines = ["| part | " + " | ".join(f"{arm}: fwd + bwd = ms (share)" for arm in arms) + " |",
             "|---" * (len(arms) + 1) + "|"]
    for name in names:
        cells = []
        for arm in arms:
            fwd, bwd = (value * scale[arm] for value in parts[arm].get(name, [0.0, 0.0]))
            share = 100 * (fwd + bwd) / step_ms[arm]
            known = name in parts[arm]
            cells.append(f"{fwd:.0f} + {bwd:.0f} = {fwd + bwd:.0f} ({share:.1f} %)" if known else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **step** (timed, CPU) | " + " | ".join(f"**{step_ms[arm]:.0f}**" for arm in arms) + " |")
    return "\n".join(lines)


def median_parts(runs: list[dict]) -> dict[str, list[float]]:
    """Per part, the median over rounds of each round's median [forward, backward] ms."""
    merged = defaultdict(list)
    for run in runs:
        for part, value in run["parts"].items():
            merged[part].append(value)
    return {part: [statistics.median(value[i] for value in values) for i in (0, 1)]
            for part, values in merged.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_args(parser, batch=64, dim=512, text_encoder="minilm", steps=5)
    parser.add_argument("--depth", type=int, default=2, help="cdds.unet_depth")
    parser.add_argument("--noise-groups", type=int, default=4, help="cdds.noise_groups z")
    parser.add_argument("--pooling", default="gpo", choices=("mean", "max", "gpo"))
    parser.add_argument("--compare", default=None, metavar="REV",
                        help="also time CDDS with trainables/methods/cdds/ at this git revision")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile N more steps of every CDDS arm, part by part")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all arms, in rotating order")
    args = parser.parse_args(argv)

    model_cfg, train_cfg, batch = step_inputs(args, pooling=args.pooling)
    cdds_job = JobConfig(method="cdds", model=model_cfg, train=train_cfg,
                         method_params={"unet_depth": args.depth, "noise_groups": args.noise_groups})
    arms = {"base": (JobConfig(method="base", model=model_cfg, train=train_cfg), None)}
    with tempfile.TemporaryDirectory() as scratch:
        if args.compare:
            arms[f"cdds@{args.compare}"] = (cdds_job, extract_revision(args.compare, scratch))
        arms["cdds"] = (cdds_job, None)
        runs: dict[str, list[dict]] = {name: [] for name in arms}
        names = list(arms)
        for round_ in range(args.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                job, overlay = arms[name]
                started = time.perf_counter()
                r = measure_in_fresh_process(job, batch, args.image_dim, args.steps, args.warmup,
                                             args.threads, overlay, args.profile)
                runs[name].append(r)
                print(f"  round {round_ + 1} {name:14s} {r['seconds'] * 1000:9.1f} ms/step wall, "
                      f"{r['cpu_seconds'] * 1000:9.1f} ms CPU ({time.perf_counter() - started:.0f} s)",
                      flush=True)
    keys = ("seconds", "cpu_seconds", "peak_mb")
    summary = {name: {key: statistics.median(r[key] for r in results) for key in keys}
               for name, results in runs.items()}
    for name, s in summary.items():
        r = runs[name][0]
        print(f"{name:14s} {s['seconds'] * 1000:9.1f} ms/step wall, {s['cpu_seconds'] * 1000:9.1f} ms CPU "
              f"(medians of {args.steps} steps, median over {args.rounds} rounds)  "
              f"peak +{s['peak_mb']:7.1f} MB{'' if r['exact_peak'] else ' (lower bound)'}  "
              f"{r['params_m']:6.2f}M trainable params")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for name in names[1:]:
        ratio = {key: summary[name][key] / summary["base"][key] for key in keys}
        print(f"ratio {name}/base = {ratio['seconds']:.2f} wall, {ratio['cpu_seconds']:.2f} CPU, "
              f"{ratio['peak_mb']:.2f} peak memory")
    print(f"[text_encoder={args.text_encoder} batch={args.batch} d={args.dim} depth={args.depth} "
          f"z={args.noise_groups} pooling={args.pooling} threads={runs['cdds'][0]['threads']} "
          f"load1={load:.1f}]")
    if args.profile:
        parts = {name: median_parts(runs[name]) for name in names[1:]}
        print(f"\nCPU ms per part of one CDDS step (profiled: medians of {args.profile} steps per round, "
              f"then over {args.rounds} rounds; rescaled to the timed CPU step):\n")
        print(profile_table(parts, {name: 1000 * summary[name]["cpu_seconds"] for name in names[1:]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
