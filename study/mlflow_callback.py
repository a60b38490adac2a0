"""MLflow tracking of a Tune study from the driver: one parent run per study, one nested child run
per trial. Ray's ``MLflowLoggerCallback`` has no parent/child runs and duplicates runs after
``Tuner.restore``; this callback keeps its trial -> run mapping in Tune's experiment state, so a
resumed study keeps writing to the same runs.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune import Callback

from study import tracking

SKIP_METRICS = {"epoch", "training_iteration", "time_this_iter_s", "time_total_s", "timestamp",
                "time_since_restore", "iterations_since_restore", "pid", "done", "steps",
                "checkpoint_dir_name", "should_checkpoint"}


def short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def error_line(trial) -> str:
    """The last non-empty line of the trial's error (Ray prints the exception last)."""
    text = ""
    path = getattr(trial, "error_file", None)
    if path:
        try:
            with open(path) as handle:
                text = handle.read()
        except OSError:
            text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:500]


class MlflowStudyCallback(Callback):
    def __init__(self, uri: str, experiment: str, parent_run_id: str, study_name: str, method: str,
                 fixed_params: dict[str, str], epochs: int):
        self.uri, self.experiment = uri, experiment
        self.parent_run_id, self.study_name, self.method = parent_run_id, study_name, method
        self.fixed_params, self.epochs = fixed_params, epochs
        self.runs: dict[str, str] = {}  # trial id -> MLflow run id (experiment state: survives resume)
        self.numbers: dict[str, int] = {}
        self.last_epoch: dict[str, int] = {}
        self._client = self._experiment_id = None

    @property
    def client(self):
        if self._client is None:
            self._client, self._experiment_id = tracking.client_for(self.uri, self.experiment)
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

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.runs:  # restored or retried: keep writing to its run
            self.client.set_tag(self.runs[trial.trial_id], "status", "running")
            return
        number = self.numbers.setdefault(trial.trial_id, len(self.numbers))
        run = self.client.create_run(self.experiment_id, run_name=self.run_name(trial, number), tags={
            "mlflow.parentRunId": self.parent_run_id, "study": self.study_name, "method": self.method,
            "trial_id": trial.trial_id, "trial_number": str(number), "status": "running",
            **self.trial_tags(trial)})
        self.runs[trial.trial_id] = run.info.run_id
        tracking.log_params(self.client, run.info.run_id, self.trial_params(trial))

    # What a child run is called and records; subclasses (the ablation's) override these.
    def run_name(self, trial, number: int) -> str:
        label = " ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in trial.config.items())
        return f"{self.method}-{number:03d} {label}".strip()

    def trial_tags(self, trial) -> dict[str, str]:
        return {}

    def trial_params(self, trial) -> dict[str, str]:
        return {**self.fixed_params, **{k: str(v) for k, v in trial.config.items()}}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        step = int(result.get("training_iteration", 0))
        metrics = {k: v for k, v in result.items() if k not in SKIP_METRICS and k != "config"
                   and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        tracking.log_epoch(self.client, run_id, metrics, step=step)
        if step == 1 or trial.trial_id not in self.last_epoch:  # once per (re)start is enough
            self.client.set_tag(run_id, "node_id", str(result.get("node_id", "unknown")))
        self.last_epoch[trial.trial_id] = step

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        done = self.last_epoch.get(trial.trial_id, 0)
        status = "completed" if done >= self.epochs else f"early-stopped by ASHA at epoch {done}"
        self.client.set_tag(run_id, "status", status)
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        self.client.set_tag(run_id, "status", "failed")
        self.client.set_tag(run_id, "error", error_line(trial))
        self.client.set_terminated(run_id, "FAILED")
