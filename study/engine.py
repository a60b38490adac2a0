"""``study run`` / ``study resume``: a Ray Tune + Optuna search over one method, tracked in MLflow.

The study directory (``storage.path/NAME``) holds Tune's experiment state, the resolved study file,
the space, the Optuna journal, ``results.csv`` and the MLflow parent run id.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from study import tracking
from study.config import validate
from study.preflight import check_data
from study.ray_session import connect, job_working_dir
from study.spaces import Param, resolve_space
from trainables.errors import ConfigError

STUDY_FILE, SPACE_FILE, PARENT_FILE, RESULTS_FILE = "study.yaml", "space.yaml", "mlflow_parent.json", "results.csv"


@dataclass
class StudyOutcome:
    study_dir: Path
    best: dict | None
    results_csv: Path
    n_trials: int
    interrupted: bool = False


def expected_trials(study, params: dict[str, Param]) -> int:
    if study.search.algorithm != "grid":
        return study.search.num_samples
    from math import prod

    from study.spaces import grid

    return prod(len(values) for values in grid(params).values())


def check_storage(path: str) -> None:
    """On a cluster every node writes checkpoints under ``storage.path`` and the driver writes its
    sidecar files (Optuna journal, results.csv) with plain file I/O, so the path must be a directory
    all nodes see: a local dir on one machine, an NFS/shared mount on a cluster."""
    if "://" in path:
        raise ConfigError(f"storage.path {path!r}: the study engine writes its Optuna journal and results.csv "
                          "beside Tune's state with plain file I/O, so it needs a directory (local on one machine, "
                          "an NFS mount shared by all nodes on a cluster), e.g. --set storage.path=/mnt/shared/results")
    job_dir = job_working_dir()
    if job_dir is not None and Path(path).is_relative_to(job_dir):
        raise ConfigError(f"storage.path {str(Path(path).relative_to(job_dir))!r} resolves inside the Ray job's "
                          f"working_dir copy ({job_dir}), which is per node and temporary: give an "
                          "absolute path all nodes share, e.g. --set storage.path=/mnt/shared/results")


def study_dir_of(study) -> Path:
    """``storage.path/NAME``, after checking that every node can reach it."""
    check_storage(study.storage.path)
    return Path(study.storage.path) / study.name


def new_study_dir(study) -> Path:
    study_dir = study_dir_of(study)
    if (study_dir / PARENT_FILE).exists():
        raise ConfigError(f"study {study.name!r} already exists at {study_dir}: continue it with "
                          f"`python -m study resume {study_dir}` or choose another name")
    return study_dir


def prepare(study, params: dict[str, Param]) -> tuple[Path, str]:
    study_dir = new_study_dir(study)
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / STUDY_FILE).write_text(yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False))
    (study_dir / SPACE_FILE).write_text(yaml.safe_dump(
        {"method": study.method, "params": {k: v.model_dump(exclude_defaults=True) for k, v in params.items()}},
        sort_keys=False))
    parent = tracking.start_parent_run(study, study.name, "study", study_dir,
                                       [study_dir / STUDY_FILE, study_dir / SPACE_FILE])
    (study_dir / PARENT_FILE).write_text(json.dumps({"run_id": parent}))
    return study_dir, parent


def run_study(study, address: str | None = None) -> StudyOutcome:
    """Validate everything, then search. Errors before this point leave nothing half-written."""
    params = resolve_space(study)
    check_data(study.data)
    new_study_dir(study)
    connect(address)  # a bad address or token fails here, before anything is written
    study_dir, parent = prepare(study, params)
    tuner = make_tuner(study, params, study_dir, parent)
    return finish(study, params, study_dir, parent, tuner.fit())


def load_study_dir(study_dir: str | Path):
    study_dir = Path(study_dir).resolve()
    for name in (STUDY_FILE, SPACE_FILE, PARENT_FILE):
        if not (study_dir / name).is_file():
            raise ConfigError(f"{study_dir} is not a study directory (no {name}); pass storage.path/NAME of a study")
    study = validate(yaml.safe_load((study_dir / STUDY_FILE).read_text()), str(study_dir / STUDY_FILE))
    from study.spaces import Space

    params = dict(Space(**yaml.safe_load((study_dir / SPACE_FILE).read_text())).params)
    parent = json.loads((study_dir / PARENT_FILE).read_text())["run_id"]
    return study, params, study_dir, parent


def resume_study(study_dir: str | Path, address: str | None = None) -> StudyOutcome:
    """Continue an interrupted study: finished trials are kept, MLflow runs are reused."""
    from study.tuner import restore_tuner

    study, params, study_dir, parent = load_study_dir(study_dir)
    connect(address)
    if not (study_dir / "tuner.pkl").exists():  # interrupted before Tune wrote its state
        return finish(study, params, study_dir, parent, make_tuner(study, params, study_dir, parent).fit())
    tuner = restore_tuner(str(study_dir), study, study.job().model_dump(mode="json"))
    return finish(study, params, study_dir, parent, tuner.fit())


def quiet_tune_console() -> None:
    """Tune's console as the study commands want it; call before building a Tuner."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic reporter: a compact live table
    # Every epoch checkpoints by design (resume from the last epoch); Tune's advice against it is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def make_tuner(study, params, study_dir: Path, parent: str):
    quiet_tune_console()
    import ray.tune

    from study.mlflow_callback import MlflowStudyCallback
    from study.tuner import OPTUNA_JOURNAL, build_tuner

    fixed = tracking.flatten(study.model_dump(mode="json", include={"method", "data", "model", "train"}))
    fixed.update(tracking.flatten({study.method: study.method_params()}))
    callback = MlflowStudyCallback(study.tracking.uri, study.tracking.experiment, parent, study.name,
                                   study.method, fixed, study.train.epochs)
    progress = ray.tune.CLIReporter(
        metric_columns={"training_iteration": "epoch", "loss": "loss", study.search.metric: study.search.metric},
        # Conditional parameters are absent from some trials, which the reporter cannot show.
        parameter_columns={n: n.split(".")[-1] for n, p in params.items() if not p.when}, max_report_frequency=30,
        sort_by_metric=True)
    return build_tuner(study, params, study.job().model_dump(mode="json"), str(study_dir / OPTUNA_JOURNAL),
                       [callback], progress)


def mark_best_child(client, parent: str, trial_id: str) -> None:
    experiment_id = client.get_run(parent).info.experiment_id
    for run in client.search_runs([experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{parent}' and tags.trial_id = '{trial_id}'")):
        client.set_tag(run.info.run_id, "best", "true")
        client.set_tag(parent, "best_run_id", run.info.run_id)


def finish(study, params, study_dir: Path, parent: str, grid) -> StudyOutcome:
    """Write results.csv, mark the best trial on the MLflow parent run, close it."""
    from study.results import results_table

    table = results_table(grid, params, study.search.metric, study.train.epochs)
    csv = study_dir / RESULTS_FILE
    table.to_csv(csv, index=False)
    client, _ = tracking.client_for(study.tracking.uri, study.tracking.experiment)
    client.log_artifact(parent, str(csv))
    best = None
    finished = table.dropna(subset=[study.search.metric]) if study.search.metric in table else table.iloc[0:0]
    if len(finished):
        ascending = study.search.mode == "min"
        best = finished.sort_values(study.search.metric, ascending=ascending).iloc[0].to_dict()
        client.set_tag(parent, "best_trial_id", best["trial_id"])
        mark_best_child(client, parent, best["trial_id"])
        client.log_metric(parent, f"best_{study.search.metric}", float(best[study.search.metric]))
        for name in params:
            if name in best and best[name] == best[name]:
                client.set_tag(parent, f"best.{name}", str(best[name]))
    interrupted = len(table) < expected_trials(study, params) or (table["status"] == "interrupted").any()
    if not interrupted:  # an interrupted study's parent run stays open until `resume` finishes it
        client.set_terminated(parent, "FINISHED")
    return StudyOutcome(study_dir, best, csv, len(table), interrupted)
