"""The GPU check: what the CUDA path does that CPU tests cannot show, in one run on one GPU.

    bash benchmarks/gpu_check.sh --out gpu_check.md      # on a GPU machine (at most ~8 min on one H200);
                                                          # also writes its section into results.md
    bash benchmarks/gpu_check.sh --dry-run                # the same code on the CPU, tiny shapes (CI)
    python -m benchmarks.gpu_check --merge gpu_check.md   # put a GPU run's section into results.md

It covers the Ray-free worker side (``trainables/``) only: the machine it is meant for has a CUDA
build of PyTorch, transformers, numba, pandas and scipy but no network, Ray or MLflow
(``benchmarks/gpu_bundle.sh`` gathers the small wheels and tokenizer files it lacks). Checks, each a
row of the section it writes:

1. **precision**: every loss term and its gradient on the shared encoders, bf16 autocast vs fp32,
   per method, on one BUTD-shaped batch (36 x 2048 regions, batch 128) with a BERT-base-size
   randomly initialised text encoder. Tolerances: term values within 2 % (relative, or 1e-3
   absolute for terms near 0), gradient cosine >= 0.98. The loss terms themselves always run in
   fp32 (``TrainStep``); what bf16 changes is what the modules under autocast compute, CDDS's UNet
   included. On the CPU (dry run) CDDS's ``s`` and ``x`` gradients came out at cosine 0.91 / 0.93,
   0.97 / 0.98 with the UNet forced to fp32, and 0.997 when only the input features were rounded
   to bf16: hardest-negative hinges on nearly tied similarities amplify the UNet's bf16 error. CPU
   autocast's op lists differ from CUDA's, so only the GPU run gives this check a verdict.
2. **host syncs per step** through ``trainables.loop.train_one_epoch`` with
   ``torch.cuda.set_sync_debug_mode("warn")``: the warnings of a short and a long epoch, differenced,
   so once-per-epoch work (the term budget, the final transfer) cancels. Target <= 2.
3. **step samples/s** for base, DIAS and CDDS at those shapes, from the same differencing of
   ``train_one_epoch`` over a device-resident batch (input pipeline excluded).
4. **loader samples/s** at 0 and 4 workers, pinned memory on and off, including the copy to the
   device (``device_batch``), against what the step consumes.
5. **checkpoint round trip**: step time before and after ``publish`` + ``restore`` (a resume used to
   move AdamW's step counters to the GPU and add a sync per parameter to every step).
6. **two processes on one GPU**: the study-file check that rejects the layout before Ray starts,
   and the raw NCCL failure it saves users from (two ranks building DDP on ``cuda:0``).
7. **evaluation**: ``retrieval_metrics`` on a 5,000 x 25,000 similarity matrix on the GPU, in
   read passes over the matrix (``sims.sum()`` timed alongside).

The dry run (``--dry-run``) runs every check on the CPU at tiny shapes, so CI proves the script
works end to end; a check that needs CUDA says "n/a (CPU)" there instead of a figure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.md"
SECTION = "## GPU check"
METHODS = ("base", "dias", "cdds")
TERM_RTOL, TERM_ATOL, GRAD_COS = 0.02, 1e-3, 0.98


@dataclass(frozen=True)
class Shapes:
    """What one run measures at: BUTD features and BERT-base on a GPU, tiny everything on a CPU."""

    images: int
    regions: int
    feature_dim: int
    batch: int
    embed_dim: int
    text_encoder: str
    short_steps: int
    long_steps: int
    eval_images: int
    loader_batches: int

    @classmethod
    def for_device(cls, device: torch.device) -> "Shapes":
        if device.type == "cuda":
            return cls(images=1536, regions=36, feature_dim=2048, batch=128, embed_dim=1024,
                       text_encoder="bert-base-random", short_steps=4, long_steps=14,
                       eval_images=5000, loader_batches=10)
        return cls(images=64, regions=12, feature_dim=64, batch=16, embed_dim=32, text_encoder="tiny",
                   short_steps=1, long_steps=2, eval_images=1000, loader_batches=2)


@dataclass
class Row:
    check: str
    figure: str
    verdict: str = ""  # pass | FAIL | "" (a measurement with no target)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def job_for(method: str, shapes: Shapes, data_root: Path, **train):
    from trainables.config import DataConfig, JobConfig, ModelConfig, TrainConfig

    return JobConfig(method=method, data=DataConfig(root=str(data_root), max_text_len=32),
                     model=ModelConfig(embed_dim=shapes.embed_dim, text_encoder=shapes.text_encoder),
                     train=TrainConfig(batch_size=shapes.batch, **train))


def write_data(root: Path, shapes: Shapes) -> Path:
    from trainables.data import write_synth

    write_synth(root, images=shapes.images, regions=shapes.regions, feature_dim=shapes.feature_dim)
    return root


def resident_batch(job, device: torch.device) -> dict:
    """One batch of the real training loader, already on the device (its ``dropout_seed`` kept):
    ``train_one_epoch`` over copies of it times the step without the input pipeline, region dropout
    included (it runs on the device)."""
    from trainables.data import build_train_loader
    from trainables.loop import open_splits
    from trainables.text_models import load_tokenizer

    split = open_splits(job).train
    loader = build_train_loader(job.data, split, load_tokenizer(job.model.text_encoder), job.train.batch_size,
                                seed=0)
    batch = next(iter(loader))
    return {key: value.to(device) if torch.is_tensor(value) and key != "dropout_seed" else value
            for key, value in batch.items()}


def first_batch(job, device: torch.device) -> dict:
    """``resident_batch`` as the model sees it (``device_batch``: upcast, region dropout)."""
    from trainables.data import device_batch

    return device_batch(resident_batch(job, device), device, job.data.region_dropout)


def build(job, device: torch.device):
    from trainables.loop import open_splits, seed_everything
    from trainables.methods import build_model

    seed_everything(0)
    model = build_model(job, open_splits(job).train.feature_dim).to(device)
    optimizer = torch.optim.AdamW(model.param_groups(job.train.lr, job.train.text_lr_scale),
                                  weight_decay=job.train.weight_decay)
    return model, optimizer


# 1. precision ----------------------------------------------------------------------------------


def term_gradients(model, batch: dict, precision: str, device: torch.device) -> dict[str, tuple[float, torch.Tensor]]:
    """``{term: (value, gradient on the shared encoders, flattened)}`` under ``precision``."""
    from trainables.device import autocast
    from trainables.loop import TrainStep

    params = model.shared_parameters()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        with autocast(device, precision):
            losses = TrainStep(model)(batch, 1)
    out = {}
    names = list(losses.terms)
    for i, name in enumerate(names):
        grads = torch.autograd.grad(losses.terms[name], params, retain_graph=i + 1 < len(names), allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).float().flatten()
                          for g, p in zip(grads, params)])
        out[name] = (float(losses.terms[name].detach()), flat)
    return out


def check_precision(shapes: Shapes, data_root: Path, device: torch.device) -> list[Row]:
    rows = []
    for method in METHODS:
        job = job_for(method, shapes, data_root)
        model, _ = build(job, device)
        model.train()
        batch = first_batch(job, device)
        full = term_gradients(model, batch, "fp32", device)
        half = term_gradients(model, batch, "bf16", device)
        parts, ok = [], True
        for name, (value, grad) in full.items():
            value_bf16, grad_bf16 = half[name]
            error = abs(value_bf16 - value)
            close = error <= max(TERM_RTOL * abs(value), TERM_ATOL)
            cosine = float(torch.nn.functional.cosine_similarity(grad, grad_bf16, dim=0)) \
                if grad.norm() > 0 and grad_bf16.norm() > 0 else float("nan")
            aligned = math.isnan(cosine) or cosine >= GRAD_COS
            ok &= close and aligned
            parts.append(f"{name} {value:.4g} vs {value_bf16:.4g} (grad cos {cosine:.4f})")
        # CPU autocast runs other ops in bf16 than CUDA's: the dry run shows figures, the GPU the verdict.
        verdict = ("pass" if ok else "FAIL") if device.type == "cuda" else ""
        rows.append(Row(f"precision, {method}: term fp32 vs bf16 (grad cosine)", "; ".join(parts), verdict))
    return rows


# 2-3. syncs and step throughput ------------------------------------------------------------------


class CountSyncs:
    """Counts the host syncs CUDA's sync debug mode warns about inside the block."""

    def __init__(self, device: torch.device):
        self.device, self.count = device, 0

    def __enter__(self):
        self._warnings = warnings.catch_warnings(record=True)
        self._records = self._warnings.__enter__()
        warnings.simplefilter("always")
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        self.count = sum("synchroniz" in str(w.message) for w in self._records)
        self._warnings.__exit__(*exc)


def timed_epoch(job, model, optimizer, batches, device: torch.device) -> tuple[float, int]:
    """(seconds, host syncs) of ``train_one_epoch`` over ``batches``."""
    from trainables.loop import TrainStep, train_one_epoch

    net = TrainStep(model)
    sync(device)
    with CountSyncs(device) as syncs:
        start = time.perf_counter()
        train_one_epoch(net, model, batches, optimizer, job, 1, device)
        sync(device)
        seconds = time.perf_counter() - start
    return seconds, syncs.count


def per_step(job, model, optimizer, batch: dict, shapes: Shapes, device: torch.device) -> tuple[float, float]:
    """(seconds per step, syncs per step): a long minus a short epoch over one resident batch."""
    timed_epoch(job, model, optimizer, [batch] * shapes.short_steps, device)  # warm-up (kernels, allocator)
    short = timed_epoch(job, model, optimizer, [batch] * shapes.short_steps, device)
    long = timed_epoch(job, model, optimizer, [batch] * shapes.long_steps, device)
    steps = shapes.long_steps - shapes.short_steps
    return (long[0] - short[0]) / steps, (long[1] - short[1]) / steps


def check_steps(shapes: Shapes, data_root: Path, device: torch.device) -> tuple[list[Row], dict[str, float]]:
    rows, rates = [], {}
    for method in METHODS:
        job = job_for(method, shapes, data_root, precision="auto")
        model, optimizer = build(job, device)
        batch = resident_batch(job, device)
        seconds, syncs = per_step(job, model, optimizer, batch, shapes, device)
        rates[method] = shapes.batch / seconds if seconds > 0 else float("nan")
        rows.append(Row(f"step samples/s, {method} (batch {shapes.batch}, {shapes.regions}x{shapes.feature_dim}, "
                        f"{shapes.text_encoder}, precision auto)",
                        f"{rates[method]:,.0f} samples/s ({seconds * 1e3:.1f} ms/step)" if seconds > 0
                        else "n/a (a longer epoch was not slower: timing noise)"))
        if device.type == "cuda":
            rows.append(Row(f"host syncs per step, {method} (target <= 2)", f"{syncs:.1f}",
                            "pass" if syncs <= 2 else "FAIL"))
        else:
            rows.append(Row(f"host syncs per step, {method}", "n/a (CPU)"))
    return rows, rates


# 4. loader -----------------------------------------------------------------------------------------


def loader_rate(job, workers: int, pin: bool, batches: int, device: torch.device) -> float:
    """Samples/s of the training loader, each batch copied to the device (``device_batch``)."""
    from trainables.data import build_train_loader, device_batch
    from trainables.loop import open_splits
    from trainables.text_models import load_tokenizer

    data = job.data.model_copy(update={"num_workers": workers})
    loader = build_train_loader(data, open_splits(job).train, load_tokenizer(job.model.text_encoder),
                                job.train.batch_size, seed=0, pin_memory=pin)
    generator = torch.Generator(device).manual_seed(0)
    iterator = iter(loader)
    device_batch(next(iterator), device, data.region_dropout, generator)  # worker start-up excluded
    sync(device)
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        batch = device_batch(next(iterator), device, data.region_dropout, generator)
        samples += len(batch["image_ids"])
    sync(device)
    return samples / (time.perf_counter() - start)


def check_loader(shapes: Shapes, data_root: Path, device: torch.device, step_rate: float) -> list[Row]:
    job = job_for("base", shapes, data_root)
    rows = []
    for workers in (0, 4):
        for pin in ((False, True) if device.type == "cuda" else (False,)):
            rate = loader_rate(job, workers, pin, shapes.loader_batches, device)
            rows.append(Row(f"loader samples/s, {workers} workers, pin_memory {pin} (to device)",
                            f"{rate:,.0f} samples/s = {rate / step_rate:.1f}x the base step's {step_rate:,.0f}"))
    return rows


# 5. checkpoint round trip ----------------------------------------------------------------------------


class KeepCheckpoint:
    """A ``Reporter`` that keeps a copy of the newest checkpoint directory."""

    rank, world_size = 0, 1

    def __init__(self, where: Path):
        self.where = where

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir:
            shutil.copytree(checkpoint_dir, self.where, dirs_exist_ok=True)

    def latest_checkpoint(self):
        return contextlib.nullcontext(str(self.where) if self.where.exists() else None)


def check_resume(shapes: Shapes, data_root: Path, device: torch.device, tmp: Path) -> list[Row]:
    from trainables.loop import publish, restore

    job = job_for("dias", shapes, data_root, precision="auto")
    model, optimizer = build(job, device)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [10])
    batch = resident_batch(job, device)
    before, syncs_before = per_step(job, model, optimizer, batch, shapes, device)
    reporter = KeepCheckpoint(tmp / "ckpt")
    publish(reporter, [{"epoch": 1.0}], model, optimizer, scheduler)
    model, optimizer = build(job, device)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [10])
    with reporter.latest_checkpoint() as where:
        history = restore(where, model, optimizer, scheduler)
    after, syncs_after = per_step(job, model, optimizer, batch, shapes, device)
    step_devices = {str(state["step"].device) for state in optimizer.state.values() if "step" in state}
    # Step times are compared on the GPU only: at the dry run's tiny shapes CPU timings are noise.
    ok = len(history) == 1 and step_devices <= {"cpu"} and (
        device.type != "cuda" or (after <= 1.15 * before and syncs_after <= syncs_before))
    return [Row("checkpoint round trip (dias): step time before -> after restore; AdamW step counters on",
                f"{before * 1e3:.1f} -> {after * 1e3:.1f} ms/step ({after / before:.2f}x); "
                f"syncs/step {syncs_before:.1f} -> {syncs_after:.1f}; counters on {', '.join(sorted(step_devices))}",
                "pass" if ok else "FAIL")]


# 6. two processes on one GPU -------------------------------------------------------------------------


def layout_error() -> str:
    """The one-line error the study-file check gives for two DDP workers on half a GPU each."""
    from study.config import load_study
    from trainables.errors import ConfigError

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "study.yaml"
        path.write_text("name: two-on-one\nmethod: base\n"
                        "resources: {workers_per_trial: 2, gpus_per_worker: 0.5}\n")
        try:
            load_study(path, [])
        except ConfigError as err:
            return str(err)
    return ""


def _ddp_on_gpu0(rank: int, port: int, errors) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        torch.cuda.set_device(0)
        net = torch.nn.Linear(4, 4).cuda(0)
        torch.nn.parallel.DistributedDataParallel(net, device_ids=[0])
        dist.barrier()
        errors.put((rank, ""))
    except Exception as err:  # the failure being demonstrated
        errors.put((rank, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"))
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def raw_two_ranks_on_gpu0(timeout: float = 60.0) -> str:
    """What NCCL does when two DDP ranks share ``cuda:0`` (what the layout check prevents)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_ddp_on_gpu0, args=(rank, port, errors)) for rank in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    results = []
    while not errors.empty():
        results.append(errors.get())
    if alive:
        return f"hung for {timeout:.0f} s (killed)"
    return "; ".join(f"rank {rank}: {msg or 'no error'}" for rank, msg in sorted(results)) or "no report"


def check_layout(device: torch.device) -> list[Row]:
    message = layout_error()
    rows = [Row("two workers on half a GPU each: study-file check before Ray", message or "accepted (no error)",
                "pass" if message else "FAIL")]
    rows.append(Row("the same layout without the check (2 NCCL ranks on cuda:0, DDP build)",
                    raw_two_ranks_on_gpu0() if device.type == "cuda" and torch.distributed.is_nccl_available()
                    else "n/a (CPU)"))
    return rows


# 7. evaluation -------------------------------------------------------------------------------------


def best_of(fn, device: torch.device, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def check_eval(shapes: Shapes, device: torch.device) -> list[Row]:
    from trainables.evaluation import retrieval_metrics

    n = shapes.eval_images
    gen = torch.Generator(device).manual_seed(0)
    sims = torch.randn(n, 5 * n, generator=gen, device=device)
    sims[torch.arange(5 * n, device=device) // 5, torch.arange(5 * n, device=device)] += 2.0
    retrieval_metrics(sims)  # warm-up
    metrics = best_of(lambda: retrieval_metrics(sims), device)
    read = best_of(lambda: sims.sum(), device)
    gbps = sims.numel() * 4 / read / 1e9
    return [Row(f"retrieval_metrics float32 {n:,} x {5 * n:,} in read passes (sims.sum())",
                f"{metrics * 1e3:.1f} ms = {metrics / read:.1f} passes of {read * 1e3:.2f} ms ({gbps:,.0f} GB/s)")]


# the run -------------------------------------------------------------------------------------------


def run_checks(device: torch.device) -> list[Row]:
    shapes = Shapes.for_device(device)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="itm-gpu-check-") as tmp:
        data_root = write_data(Path(tmp) / "data", shapes)
        steps: dict[str, float] = {}

        def guarded(name: str, fn):
            started = time.perf_counter()
            try:
                rows.extend(fn())
            except Exception as err:  # one broken check must not hide the others' figures
                traceback.print_exc()
                rows.append(Row(name, f"error: {type(err).__name__}: {str(err).splitlines()[0][:300]}", "FAIL"))
            print(f"[gpu_check] {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)

        def steps_and_rates():
            found, rates = check_steps(shapes, data_root, device)
            steps.update(rates)
            return found

        guarded("precision", lambda: check_precision(shapes, data_root, device))
        guarded("steps", steps_and_rates)
        guarded("loader", lambda: check_loader(shapes, data_root, device, steps.get("base", float("nan"))))
        guarded("checkpoint round trip", lambda: check_resume(shapes, data_root, device, Path(tmp)))
        guarded("two processes on one GPU", lambda: check_layout(device))
        guarded("evaluation", lambda: check_eval(shapes, device))
    return rows


def describe(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU dry run ({platform.machine()})"
    return (f"{name}; torch {torch.__version__}, CUDA {torch.version.cuda or '-'}; Python "
            f"{platform.python_version()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def render(rows: list[Row], device: torch.device, wall: float) -> str:
    lines = [f"{SECTION} ({describe(device)})", "",
             f"Written by `bash benchmarks/gpu_check.sh` in {wall:.0f} s; one run, every figure from it.", "",
             "| check | figure | verdict |", "|---|---|---|"]
    lines += [f"| {row.check} | {row.figure.replace('|', '/')} | {row.verdict} |" for row in rows]
    return "\n".join(lines) + "\n"


def merge(section: str, results: Path = RESULTS) -> None:
    """Replace the GPU section of ``results.md`` (or append one) with ``section``."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    kept = re.split(rf"\n(?={re.escape(SECTION)})", text)[0].rstrip("\n")
    results.write_text(kept + "\n\n" + section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="run every check on the CPU at tiny shapes")
    parser.add_argument("--out", help="write the section here (default: print it)")
    parser.add_argument("--merge", metavar="SECTION_FILE", help="put a GPU run's section into benchmarks/results.md")
    args = parser.parse_args(argv)
    if args.merge:
        merge(Path(args.merge).read_text())
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run for the CPU run", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    started = time.perf_counter()
    rows = run_checks(device)
    section = render(rows, device, time.perf_counter() - started)
    print(section)
    if args.out:
        Path(args.out).write_text(section)
    if not args.dry_run:  # on a GPU machine with its own checkout; a device loan brings back --out instead
        merge(section)
    return 1 if any(row.verdict == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
