"""What Ray costs: a Ray Train worker's steady-state epoch vs plain ``fit``, and a trial's start-up.

    python -m benchmarks.ray_overhead                     # both parts (~3 min on 2 cores)
    python -m benchmarks.ray_overhead --skip-startup      # only the steady-state ratio
    python -m benchmarks.ray_overhead --skip-startup --set model.embed_dim=512 train.batch_size=128

1. Steady state. The job of ``studies/smoke.yaml`` (tiny encoder, d 64, batch 32; ``--set`` changes
   it) on a synthetic benchmark of ``--images`` train images (written to a temp dir) runs
   ``--epochs`` epochs, alternately as ``fit(job, LocalReporter)`` in this process and through
   ``build_trainer`` on one Ray Train worker: plain, Ray, plain, ... for ``--rounds`` Ray runs, so
   drifting machine load biases neither side. The plain runs use as many torch threads as a 1-CPU
   Ray worker gets; the worker's count (``OMP_NUM_THREADS`` and ``torch.get_num_threads()``) is
   read from a 1-CPU Ray task and printed, and the run stops if they differ. The figure is the
   median ``epoch_time_s`` (training only, no evaluation) over epochs >= 2 of all Ray runs over the
   same median of all plain runs (target <= 1.05). Ray's daemons run during both. The smoke job's
   steps are a few milliseconds of small ops, so Python overhead (and any GIL time Ray's threads in
   the worker take) weighs most there; ``--set model.embed_dim=512 train.batch_size=128`` is a
   step dominated by compute.
2. Start-up. ``run_study`` on the same study with one trial, FIFO, ``--startup-epochs`` epochs, once
   with ``resources.workers_per_trial=1`` (``fit`` runs inside the Tune trial) and once with 2
   (the trial builds a ``TorchTrainer`` with two DDP workers). From the trial's ``result.json``:
   start-up = first epoch's ``time_this_iter_s`` minus the median of the later ones (the last epoch,
   which also evaluates the test split, is left out).

Ray runs locally on 2 CPUs with its session files in a temp dir and is shut down at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks._common import command, local_ray, quiet_env, record, smoke_study, synth_dataset


def ray_worker_threads() -> tuple[str | None, int]:
    """``(OMP_NUM_THREADS, torch.get_num_threads())`` inside a 1-CPU Ray worker process."""
    import ray

    @ray.remote(num_cpus=1)
    def probe() -> tuple[str | None, int]:
        import os

        import torch

        return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()

    return ray.get(probe.remote())


def plain_epoch_times(job, out_dir: Path, threads: int) -> list[float]:
    """``epoch_time_s`` of every epoch of ``fit`` in this process, with ``threads`` torch threads."""
    import torch

    from trainables.loop import fit
    from trainables.reporters import LocalReporter

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        history = fit(job, LocalReporter(out_dir))
    finally:
        torch.set_num_threads(previous)
    return [h["epoch_time_s"] for h in history]


def ray_train_epoch_times(job, storage: Path, name: str) -> list[float]:
    """``epoch_time_s`` of every epoch of the same job on one Ray Train worker (1 CPU)."""
    from trainables.ray_train import WorkerResources, build_trainer

    result = build_trainer(job, WorkerResources(num_workers=1), name=name, storage_path=str(storage)).fit()
    if result.error is not None:
        raise result.error
    history = getattr(result, "return_value", None)
    if history:
        return [h["epoch_time_s"] for h in history]
    return list(result.metrics_dataframe["epoch_time_s"])


def steady(runs: list[list[float]]) -> float:
    """Median over runs of epochs >= 2 (the first pays for allocator and cache warm-up)."""
    return statistics.median(t for times in runs for t in times[1:])


def trial_iteration_times(study_dir: Path) -> list[float]:
    """``time_this_iter_s`` of each reported epoch of the study's single trial."""
    files = sorted(study_dir.glob("trial_*/result.json"))
    if len(files) != 1:
        raise RuntimeError(f"expected one trial result.json under {study_dir}, found {len(files)}")
    rows = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
    return [row["time_this_iter_s"] for row in sorted(rows, key=lambda r: r["training_iteration"])]


def trial_startup(workers: int, data_root: Path, tmp: Path, epochs: int) -> tuple[float, list[float]]:
    """(start-up seconds, per-epoch seconds) of one ``run_study`` trial with ``workers`` per trial."""
    from study.search import run_study

    study = smoke_study([f"name=bench-startup-w{workers}", f"data.root={data_root}", f"train.epochs={epochs}",
                         "search.num_samples=1", "search.scheduler=fifo", "search.max_failures=0",
                         f"resources.workers_per_trial={workers}", f"storage.path={tmp / 'results'}",
                         f"tracking.uri=sqlite:///{tmp / 'mlruns.db'}"])
    outcome = run_study(study)
    times = trial_iteration_times(outcome.study_dir)
    later = times[1:-1] or times[1:]
    return times[0] - statistics.median(later), times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="synthetic train images (smoke.yaml uses 300)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of each steady-state run")
    parser.add_argument("--rounds", type=int, default=2, help="Ray Train runs (plain runs: one more)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of the smoke job for the steady-state runs (study --set syntax)")
    parser.add_argument("--startup-epochs", type=int, default=5, help="epochs of each start-up trial")
    parser.add_argument("--skip-startup", action="store_true", help="only the steady-state comparison")
    parser.add_argument("--skip-steady", action="store_true", help="only the trial start-up comparison")
    parser.add_argument("--record", default=None, help="append the figures (JSON lines) to this file")
    args = parser.parse_args(argv)
    quiet_env()
    cmd = command("benchmarks.ray_overhead", argv)

    with tempfile.TemporaryDirectory(prefix="itm-ray-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        data_root = synth_dataset(tmp / "synth", args.images)
        job = smoke_study([f"data.root={data_root}", f"train.epochs={args.epochs}", *args.set]).job()
        with local_ray():
            if not args.skip_steady:
                omp, threads = ray_worker_threads()
                print(f"1-CPU Ray worker: OMP_NUM_THREADS={omp}, torch threads {threads}; plain runs use {threads}")
                if omp is not None and int(omp) != threads:
                    raise SystemExit(f"Ray worker has OMP_NUM_THREADS={omp} but {threads} torch threads")
                plain: list[list[float]] = [plain_epoch_times(job, tmp / "plain-0", threads)]
                on_ray: list[list[float]] = []
                for round_ in range(args.rounds):
                    on_ray.append(ray_train_epoch_times(job, tmp / "ray", f"bench-ray-overhead-{round_}"))
                    plain.append(plain_epoch_times(job, tmp / f"plain-{round_ + 1}", threads))
                for label, runs in (("plain", plain), ("Ray Train", on_ray)):
                    for times in runs:
                        print(f"{label:>9} epoch_time_s: " + " ".join(f"{t:.2f}" for t in times))
                ratio = steady(on_ray) / steady(plain)
                size = f"smoke job{' with ' + ' '.join(args.set) if args.set else ''}"
                record(args.record, f"Ray Train worker (1) / plain `fit`: steady-state epoch time (epochs >= 2, "
                       f"{args.rounds} Ray runs vs {args.rounds + 1} plain, {size})",
                       f"{ratio:.3f} ({steady(on_ray):.3f} s vs {steady(plain):.3f} s; target <= 1.05)", cmd)
            if not args.skip_startup:
                startups = {}
                for workers in (1, 2):
                    startups[workers], times = trial_startup(workers, data_root, tmp, args.startup_epochs)
                    print(f"workers_per_trial={workers}: time_this_iter_s " + " ".join(f"{t:.2f}" for t in times)
                          + f" -> start-up {startups[workers]:.1f} s")
                record(args.record, "trial start-up before the first epoch: plain Tune trial vs Tune + Ray Train "
                       "(2 DDP workers)", f"{startups[1]:.1f} s vs {startups[2]:.1f} s "
                       f"(+{startups[2] - startups[1]:.1f} s for Ray Train)", cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
