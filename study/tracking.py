"""MLflow on the driver only (workers report through Ray). sqlite store, artifacts beside it."""

from __future__ import annotations

import logging
import math
import os
import platform
import subprocess
import time
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from study import results  # noqa: E402

MAX_PARAM_LEN = 6000
# Keys of a reported result that are bookkeeping, not metrics of the model.
SKIP_METRICS = {"epoch", "training_iteration", "time_this_iter_s", "time_total_s", "timestamp",
                "time_since_restore", "iterations_since_restore", "pid", "done", "steps",
                "checkpoint_dir_name", "should_checkpoint"}


def artifact_root(uri: str) -> str | None:
    """``sqlite:////abs/mlruns.db`` keeps artifacts in ``/abs/mlartifacts`` (not the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def client_for(uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """An MLflow client on ``uri`` and the id of ``experiment`` (created on first use)."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return client, found.experiment_id
    return client, client.create_experiment(experiment, artifact_location=artifact_root(uri))


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.lr": "0.0005", ...}`` (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LEN]
    return flat


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow caps one batch at 100 params
        client.log_batch(run_id, params=items[start:start + 100])


def log_epoch(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]
    for start in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[start:start + 500])


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, str]:
    """Software versions, read from the installed packages' metadata (nothing is imported)."""
    versions = {name: package_version(name) for name in ("torch", "ray", "optuna")}
    return {"python": platform.python_version(), **versions, "platform": platform.platform()}


def start_parent_run(study, run_name: str, kind: str, folder: Path, files: list[Path],
                     extra_tags: dict[str, str] | None = None) -> str:
    """A study's or ablation's parent run: tags (study, method, ``kind``, git commit, its folder and
    ``extra_tags``), the resolved study file and the software versions as params, ``files`` as
    artifacts. Returns the run id."""
    client, experiment_id = client_for(study.tracking.uri, study.tracking.experiment)
    tags = {"study": study.name, "method": study.method, "kind": kind, "git_commit": git_commit(),
            "study_dir": str(folder), **(extra_tags or {})}
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    params = flatten(study.model_dump(mode="json"))
    log_params(client, run.info.run_id, {**params, **{f"env.{k}": v for k, v in environment().items()}})
    for path in files:
        client.log_artifact(run.info.run_id, str(path))
    return run.info.run_id


def short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class TrialRuns:
    """One MLflow child run per trial under the study's parent run (Ray-free; ``study/tuner.py``
    forwards Tune's callback events here).

    Ray's ``MLflowLoggerCallback`` has no parent/child runs and duplicates runs after
    ``Tuner.restore``. Here the trial -> run map is part of Tune's experiment state
    (``get_state``/``set_state``), so a resumed study keeps writing to the same runs.
    Subclasses (the ablation's) change only ``run_name``, ``trial_tags`` and ``trial_params``.
    """

    def __init__(self, uri: str, experiment: str, parent_run_id: str, study_name: str, method: str,
                 fixed_params: dict[str, str], epochs: int):
        self.uri, self.experiment = uri, experiment
        self.parent_run_id, self.study_name, self.method = parent_run_id, study_name, method
        self.fixed_params, self.epochs = fixed_params, epochs
        self.runs: dict[str, str] = {}  # trial id -> MLflow run id
        self.numbers: dict[str, int] = {}
        self.last_epoch: dict[str, int] = {}
        self._client = self._experiment_id = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client, self._experiment_id = client_for(self.uri, self.experiment)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._client = None  # reopening the client also looks the experiment up
            _ = self.client
        return self._experiment_id

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = state["_experiment_id"] = None  # not picklable; reopened lazily
        return state

    def get_state(self) -> dict:
        return {"runs": self.runs, "numbers": self.numbers, "last_epoch": self.last_epoch}

    def set_state(self, state: dict) -> None:
        self.runs, self.numbers = dict(state["runs"]), dict(state["numbers"])
        self.last_epoch = dict(state.get("last_epoch", {}))

    def started(self, trial_id: str, config: dict) -> None:
        if trial_id in self.runs:  # restored or retried: keep writing to its run
            self.client.set_tag(self.runs[trial_id], "status", results.INCOMPLETE)
            return
        number = self.numbers.setdefault(trial_id, len(self.numbers))
        run = self.client.create_run(self.experiment_id, run_name=self.run_name(config, number), tags={
            "mlflow.parentRunId": self.parent_run_id, "study": self.study_name, "method": self.method,
            "trial_id": trial_id, "trial_number": str(number), "status": results.INCOMPLETE,
            **self.trial_tags(config)})
        self.runs[trial_id] = run.info.run_id
        log_params(self.client, run.info.run_id, self.trial_params(config))

    # What a child run is called and records; the ablation's subclass overrides these.
    def run_name(self, config: dict, number: int) -> str:
        label = " ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in config.items())
        return f"{self.method}-{number:03d} {label}".strip()

    def trial_tags(self, config: dict) -> dict[str, str]:
        return {}

    def trial_params(self, config: dict) -> dict[str, str]:
        return {**self.fixed_params, **{k: str(v) for k, v in config.items()}}

    def reported(self, trial_id: str, result: dict) -> None:
        run_id = self.runs.get(trial_id)
        if run_id is None:
            return
        step = int(result.get("training_iteration", 0))
        metrics = {k: v for k, v in result.items() if k not in SKIP_METRICS and k != "config"
                   and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        log_epoch(self.client, run_id, metrics, step=step)
        if step == 1 or trial_id not in self.last_epoch:  # once per (re)start is enough
            self.client.set_tag(run_id, "node_id", str(result.get("node_id", "unknown")))
        self.last_epoch[trial_id] = step

    def completed(self, trial_id: str) -> None:
        """Tune ended the trial without an error: all epochs, or stopped early by the scheduler."""
        run_id = self.runs.get(trial_id)
        if run_id is None:
            return
        done = self.last_epoch.get(trial_id, 0)
        self.client.set_tag(run_id, "status", results.trial_status(False, done, self.epochs, live=False))
        self.client.set_tag(run_id, "epochs", str(done))
        self.client.set_terminated(run_id, "FINISHED")

    def failed(self, trial_id: str, error: str) -> None:
        run_id = self.runs.get(trial_id)
        if run_id is None:
            return
        self.client.set_tag(run_id, "status", results.FAILED)
        self.client.set_tag(run_id, "error", error)
        self.client.set_terminated(run_id, "FAILED")


def mark_best(client: MlflowClient, parent: str, trial_id: str) -> None:
    """Tag the parent run with the best trial (``best_trial_id``, ``best_run_id``) and that trial's
    child run with ``best=true``."""
    client.set_tag(parent, "best_trial_id", trial_id)
    experiment_id = client.get_run(parent).info.experiment_id
    for run in client.search_runs([experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{parent}' and tags.trial_id = '{trial_id}'")):
        client.set_tag(run.info.run_id, "best", "true")
        client.set_tag(parent, "best_run_id", run.info.run_id)
