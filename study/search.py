"""``study run`` / ``study resume``: a Ray Tune + Optuna search over one method, tracked in MLflow.

The study directory (``storage.path/NAME``, ``study/layout.py``) holds Tune's experiment state, the
resolved study file, the space, the Optuna journal, ``results.csv`` and the MLflow parent run id.
Ray itself is behind ``study/tuner.py`` and ``study/ray_session.py``, and MLflow behind
``study/tracking.py``: all imported once every check has passed, so bad input fails fast. The data
checks (``study/preflight.py``, which loads torch) and pandas load only once the study file and its
search space have passed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from dataclasses import dataclass, replace
from math import prod
from pathlib import Path

import yaml

from study.layout import (
    OPTUNA_JOURNAL,
    PARENT_FILE,
    RESULTS_FILE,
    SPACE_FILE,
    STUDY_FILE,
    TUNER_STATE,
    load_study_dir,
    move_aside,
    study_dir_of,
    write_parent,
)
from study.spaces import Param, grid, resolve_space, warm_start_points
from trainables.errors import ConfigError


@dataclass
class StudyOutcome:
    study_dir: Path
    best: dict | None  # None for several objectives: the study has a Pareto set instead
    results_csv: Path
    n_trials: int
    interrupted: bool = False
    pareto: list[dict] | None = None  # several objectives: the Pareto set, best first by the first objective


def connect(address: str | None, resources) -> None:
    """Start or join Ray (imported only now: a bad study fails before Ray loads), and check that a
    trial's workers fit on the cluster."""
    from study import ray_session

    ray_session.connect(address, resources)


def expected_trials(study, params: dict[str, Param]) -> int:
    if study.search.algorithm != "grid":
        return study.search.num_samples
    return prod(len(values) for values in grid(params).values())


def new_study_dir(study) -> Path:
    study_dir = study_dir_of(study)
    if (study_dir / PARENT_FILE).exists():
        raise ConfigError(f"study {study.name!r} already exists at {study_dir}: continue it with "
                          f"`python -m study resume {study_dir}`, start it over with `python -m study run "
                          "STUDY.yaml --restart` (moves the old folder aside), or choose another name "
                          "(--set name=NEW)")
    return study_dir


def prepare(study, params: dict[str, Param]) -> tuple[Path, str]:
    from study import tracking

    study_dir = new_study_dir(study)
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / STUDY_FILE).write_text(yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False))
    (study_dir / SPACE_FILE).write_text(yaml.safe_dump(
        {"method": study.method, "params": {k: v.model_dump(exclude_defaults=True) for k, v in params.items()}},
        sort_keys=False))
    parent = tracking.start_parent_run(study, study.name, "study", study_dir,
                                       [study_dir / STUDY_FILE, study_dir / SPACE_FILE])
    write_parent(study_dir, parent)
    return study_dir, parent


def trial_runs(study, parent: str):
    """One MLflow child run per trial, with the study's fixed values as params."""
    from study import tracking

    fixed = tracking.flatten(study.model_dump(mode="json", include={"method", "data", "model", "train"}))
    fixed.update(tracking.flatten({study.method: study.method_params()}))
    # PBT changes its trials' values while they train: each epoch logs them as metrics ``hp/<name>``.
    schedule = tuple(resolve_space(study)) if study.search.algorithm == "pbt" else ()
    return tracking.TrialRuns(study.tracking.uri, study.tracking.experiment, parent, study.name,
                              study.method, fixed, study.train.epochs, schedule=schedule)


def run_study(study, address: str | None = None, restart: bool = False) -> StudyOutcome:
    """Validate everything, then search. Errors before this point leave nothing half-written.
    ``restart``: an existing study of this name is moved aside (``NAME.old-<time>``) first."""
    params = resolve_space(study)
    points = warm_start_points(study, params)
    from study.preflight import check_study

    check_study(study)
    study_dir = study_dir_of(study) if restart else new_study_dir(study)
    connect(address, study.resources)  # a bad address, token or resource request fails here, before any write
    from study.tuner import build_tuner, trial_records

    moved = move_aside(study_dir) if restart else None
    if moved is not None:
        print(f"restart: moved the earlier study folder {study_dir} aside to {moved.name}")
    study_dir, parent = prepare(study, params)
    with failed_runs_marked(study, parent, study_dir):
        tuner = build_tuner(study, params, str(study_dir / OPTUNA_JOURNAL), trial_runs(study, parent), points)
        return finish(study, params, study_dir, parent, trial_records(tuner.fit()))


def resume_study(study_dir: str | Path, address: str | None = None) -> StudyOutcome:
    """Continue an interrupted study: finished trials are kept, MLflow runs are reused."""
    study, params, study_dir, parent = load_study_dir(study_dir)
    from study.preflight import check_study

    check_study(study)
    connect(address, study.resources)
    from study.tuner import build_tuner, restore_tuner, trial_records

    with failed_runs_marked(study, parent, study_dir):
        if (study_dir / TUNER_STATE).exists():
            tuner = restore_tuner(str(study_dir), study)
        else:  # interrupted before Tune wrote its state
            tuner = build_tuner(study, params, str(study_dir / OPTUNA_JOURNAL), trial_runs(study, parent),
                                warm_start_points(study, params))
        return finish(study, params, study_dir, parent, trial_records(tuner.fit()))


@contextlib.contextmanager
def failed_runs_marked(study, parent: str, study_dir: Path) -> Iterator[None]:
    """A command that fails marks its MLflow parent and open child runs FAILED (they used to stay
    RUNNING). An interruption (Ctrl-C, SIGTERM) is not a failure: the runs stay open for resume."""
    from study import tracking

    try:
        yield
    except Exception as err:
        tracking.fail_open_runs(study.tracking.uri, study.tracking.experiment, parent,
                                f"{type(err).__name__}: {err}", folder=study_dir)
        raise


def finish(study, params, study_dir: Path, parent: str, records) -> StudyOutcome:
    """Write results.csv, mark the best trial (one metric) or the Pareto set (several objectives)
    on the MLflow runs, close the parent run."""
    from study import tracking, tracking_buffer
    from study.ray_session import stop_requested
    from study.results import INCOMPLETE, PARETO, best_trial, pareto_column, study_table

    if stop_requested():  # Ctrl+C / SIGTERM: Tune ended the running trials itself; interrupted, not early-stopped
        records = [replace(record, live=None) if record.live is False else record for record in records]
    s = study.search
    names = [name for name, _ in s.objectives]
    table = study_table(records, params, names, study.train.epochs)
    best, pareto = None, None
    if s.multi_objective:
        table[PARETO] = pareto_column(table, s.objectives)
        pareto = table[table[PARETO]].sort_values(s.primary, ascending=s.primary_mode == "min").to_dict("records")
    else:
        best = best_trial(table, s.metric, s.mode)
    csv = study_dir / RESULTS_FILE
    table.to_csv(csv, index=False)
    interrupted = len(table) < expected_trials(study, params) or (table["status"] == INCOMPLETE).any()
    # An interrupted study's parent run stays open until `resume` finishes it.
    status = None if interrupted else "FINISHED"
    try:
        with tracking_buffer.short_retries():
            client, _ = tracking.client_for(study.tracking.uri, study.tracking.experiment)
            client.log_artifact(parent, str(csv))
            if best is not None:
                mark_best(client, parent, best, s.metric, params)
            if pareto:
                tracking.mark_pareto(client, parent, [str(row["trial_id"]) for row in pareto])
            if status is not None:
                client.set_terminated(parent, status)
    except Exception as err:  # MLflow went away by the end: the results are on disk, the close is kept
        if not tracking_buffer.outage(err):
            raise
        line = tracking.close_parent(study.tracking.uri, study.tracking.experiment, study_dir, parent, status, [csv])
        if line:
            print(line)
    return StudyOutcome(study_dir, best, csv, len(table), interrupted, pareto)


def mark_best(client, parent: str, best: dict, metric: str, params) -> None:
    """The best trial's tags and value on the parent run (``best_trial_id``, ``best_<metric>``, ``best.<name>``)."""
    from study import tracking

    tracking.mark_best(client, parent, best["trial_id"])
    client.log_metric(parent, f"best_{metric}", float(best[metric]))
    for name in params:
        if name in best and best[name] == best[name]:
            client.set_tag(parent, f"best.{name}", str(best[name]))
