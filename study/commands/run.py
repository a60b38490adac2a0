"""``study run STUDY.yaml``: the search study (Ray Tune + Optuna, every trial in MLflow)."""

from __future__ import annotations

from study.config import load_study


def add_parser(sub) -> None:
    parser = sub.add_parser("run", help="run the study's hyperparameter search")
    parser.add_argument("study", help="study YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a study-file value, e.g. --set search.num_samples=8 (repeatable)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from study.engine import run_study

    study = load_study(args.study, args.overrides)
    return report(run_study(study, address=args.address), study)


def report(outcome, study) -> int:
    print(f"\n{study.name}: {outcome.n_trials} trials of {study.method}")
    if outcome.best is None:
        print("no trial finished with a metric")
    else:
        metric = study.search.metric
        print(f"best trial {outcome.best['trial_id']}: {metric} = {outcome.best[metric]:.2f}")
        for key, value in outcome.best.items():
            if "." in key and value == value:  # NaN = a conditional parameter this trial did not use
                print(f"  {key} = {value}")
    print(f"results : {outcome.results_csv}")
    print(f"study   : {outcome.study_dir}   (resume: python -m study resume {outcome.study_dir})")
    print(f"MLflow  : mlflow ui --backend-store-uri {study.tracking.uri}")
    if outcome.interrupted:
        print(f"interrupted: continue with `python -m study resume {outcome.study_dir}`")
        return 130
    return 0 if outcome.best is not None else 1
