"""``study train STUDY.yaml [--set k=v ...]``: one training run (no search) on Ray Train."""

from __future__ import annotations

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

    result = run_training(study, address=args.address, resume=args.resume)
    print_metrics(result.final, title=f"{study.name}: {study.method}, {study.train.epochs} epochs")
    print(f"\nrun directory : {result.run_dir}")
    print(f"MLflow        : mlflow ui --backend-store-uri {study.tracking.uri}  (run '{result.run_name}')")
    return 0


def print_metrics(metrics: dict[str, float], title: str) -> None:
    """Validation (and test, when present) retrieval metrics as a small aligned table."""
    print(title)
    rows = [("val", "")]
    if any(f"test_{key}" in metrics for key in RETRIEVAL):
        rows.append(("test", "test_"))
    print(f"{'split':<6}" + "".join(f"{key:>9}" for key in RETRIEVAL))
    for label, prefix in rows:
        cells = "".join(f"{metrics.get(prefix + key, float('nan')):>9.1f}" for key in RETRIEVAL)
        print(f"{label:<6}{cells}")
