"""``study run STUDY.yaml``: the search study (Ray Tune + Optuna, every trial in MLflow)."""

from __future__ import annotations

import sys
from pathlib import Path

from study.commands import add_address, add_overrides
from study.config import load_study
from study.layout import PARENT_FILE


def add_parser(sub) -> None:
    parser = sub.add_parser("run", help="run the study's hyperparameter search")
    parser.add_argument("study", help="study YAML file")
    add_overrides(parser)
    parser.add_argument("--restart", action="store_true",
                        help="start over: move an existing study of this name aside (to NAME.old-<time>) "
                             "once every check has passed, e.g. after fixing its search space")
    add_address(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    study = load_study(args.study, args.overrides)
    from study.search import run_study  # torch, pandas and Ray load inside, each once its checks have passed

    try:
        outcome = run_study(study, address=args.address, restart=args.restart)
    except KeyboardInterrupt:  # a second Ctrl+C/SIGTERM, or one outside the Tune run (study/ray_session.py)
        return interrupted(Path(study.storage.path) / study.name)
    return report(outcome, study)


def interrupted(study_dir: Path) -> int:
    """Exit 130 with the command that continues the study, if it got far enough to have one."""
    if (study_dir / PARENT_FILE).exists():
        print(f"interrupted: continue with `python -m study resume {study_dir}`", file=sys.stderr)
    else:
        print("interrupted before the study started: nothing to resume", file=sys.stderr)
    return 130


def write_report(study_dir) -> str:
    """The study report (tables, Optuna plots, one HTML page); a failure here never hides results."""
    from study.report.build import build_report

    try:
        return str(build_report(study_dir).out_dir / "index.html")
    except Exception as err:  # noqa: BLE001 — the study itself succeeded; say why the report did not
        return f"not written ({type(err).__name__}: {err}); retry with `python -m study report {study_dir}`"


def print_pareto(pareto: list[dict], objectives: list[tuple[str, str]]) -> None:
    """Several objectives: the Pareto set, one line per trial, best first by the first objective."""
    print(f"Pareto set of {len(pareto)} trial(s) over " + ", ".join(f"{n} ({m})" for n, m in objectives) + ":")
    for row in pareto:
        print(f"  {row['trial_id']}: " + ", ".join(f"{name} = {row[name]:.4g}" for name, _ in objectives))


def report(outcome, study) -> int:
    print(f"\n{study.name}: {outcome.n_trials} trials of {study.method}")
    if outcome.pareto:
        print_pareto(outcome.pareto, study.search.objectives)
    elif outcome.best is None:
        print("no trial finished with a metric")
    else:
        metric = study.search.metric
        print(f"best trial {outcome.best['trial_id']}: {metric} = {outcome.best[metric]:.2f}")
        for key, value in outcome.best.items():
            if "." in key and value == value:  # NaN = a conditional parameter this trial did not use
                print(f"  {key} = {value}")
    print(f"results : {outcome.results_csv}")
    print(f"report  : {write_report(outcome.study_dir)}")
    print(f"study   : {outcome.study_dir}   (resume: python -m study resume {outcome.study_dir})")
    print(f"MLflow  : mlflow ui --backend-store-uri {study.tracking.uri}")
    if outcome.interrupted:
        print(f"interrupted: continue with `python -m study resume {outcome.study_dir}`")
        return 130
    return 0 if outcome.best is not None or outcome.pareto else 1
