"""``study train STUDY.yaml [--set k=v ...]``: one training run (no search) on Ray Train."""

from __future__ import annotations

import shlex
import sys

from study.commands import add_address, add_overrides
from study.config import load_study
from study.results import RETRIEVAL


def add_parser(sub) -> None:
    parser = sub.add_parser("train", help="one training run of the study's method on Ray Train")
    parser.add_argument("study", help="study YAML file")
    add_overrides(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the newest interrupted run of this study from its last checkpoint")
    add_address(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    study = load_study(args.study, args.overrides)
    from study.train import run_training  # Ray loads once every check has passed

    try:
        result = run_training(study, address=args.address, resume=args.resume)
    except KeyboardInterrupt:  # Ctrl+C or SIGTERM: the run's checkpoints so far are kept
        again = shlex.join(["python", "-m", "study", "train", args.study,
                            *(part for value in args.overrides for part in ("--set", value)), "--resume"])
        print(f"interrupted: continue from the last checkpoint with `{again}`", file=sys.stderr)
        return 130
    print_metrics(result.final, title=f"{study.name}: {study.method}, {study.train.epochs} epochs")
    print(f"\nrun directory : {result.run_dir}")
    print(f"MLflow        : mlflow ui --backend-store-uri {study.tracking.uri}  (run '{result.run_name}')")
    if result.tracking_kept:
        print(result.tracking_kept, file=sys.stderr)
    return 0


def metric_rows(metrics: dict[str, float]) -> list[tuple[str, str]]:
    """(label, key prefix) of each split the run reported: the final epoch's validation and test
    (COCO: 1K folds too), then both again at the epoch with the best validation rSum."""
    best = int(metrics["best_epoch"]) if "best_epoch" in metrics else None
    if best is not None and best == int(metrics.get("epoch", 0)):
        best = None  # the final epoch is the best one: its rows would be printed twice
    rows = [("val", "")]
    for label, prefix in (("test 1k", "test_1k_"), ("test", "test_")):
        if any(prefix + key in metrics for key in RETRIEVAL):
            rows.append((label, prefix))
    if best is not None:
        rows += [(f"{label}@ep{best}", "best_" + prefix) for label, prefix in rows
                 if any("best_" + prefix + key in metrics for key in RETRIEVAL)]
    return rows


def print_metrics(metrics: dict[str, float], title: str) -> None:
    """Retrieval metrics as a small aligned table: the final epoch's, then (``@epK``) those at the
    epoch with the best validation rSum, which is the checkpoint an ablation reports by default."""
    print(title)
    rows = metric_rows(metrics)
    width = max(6, *(len(label) + 1 for label, _ in rows))
    print(f"{'split':<{width}}" + "".join(f"{key:>9}" for key in RETRIEVAL))
    for label, prefix in rows:
        cells = "".join(f"{metrics.get(prefix + key, float('nan')):>9.1f}" for key in RETRIEVAL)
        print(f"{label:<{width}}{cells}")
    if "best_epoch" in metrics:
        best, last = int(metrics["best_epoch"]), int(metrics.get("epoch", 0))
        if best == last:
            print(f"best validation rSum at the final epoch ({last})")
        else:
            print(f"best validation rSum at epoch {best} of {last}: rows @ep{best} are that epoch's, "
                  "the others the final epoch's")
