"""MLflow on the driver only (workers report through Ray). sqlite store, artifacts beside it."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any
from urllib.parse import quote

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE  # noqa: E402
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH  # noqa: E402

from study import results  # noqa: E402
from study.spaces import WARM_START_KEY  # noqa: E402
from study.tracking_buffer import Outbox, fail_open, one_line, short_retries  # noqa: E402

MAX_PARAM_LEN = 6000
# MLflow 3's experiment kind: "custom_model_development" is what its UI calls "Machine learning"
# (the other kind is "GenAI apps & agents"). MLflow 3.17's UI decides its landing page by a global
# "GenAI | Model training" switch instead (the ``workflowType`` URL parameter, else the browser's
# choice, else GenAI), so every address we print or link carries ``UI_TRAINING`` (docs/mlflow-ui.md).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
UI_TRAINING = "workflowType=machine_learning"
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # experiment tag the UI's ?viewStateShareKey= reads
NOTE_TAG = MLFLOW_RUN_NOTE  # a run's Markdown description, shown on its overview page
MAX_NOTE_LEN = MAX_TAG_VAL_LENGTH  # longer tag values are cut by MLflow without a word
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
    """An MLflow client on ``uri`` and the id of ``experiment`` (created on first use), marked as a
    training experiment (``EXPERIMENT_KIND``) unless someone already chose its kind."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return client, client.create_experiment(experiment, artifact_location=artifact_root(uri),
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in found.tags:  # created before this tag existed, or by another tool
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return client, found.experiment_id


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


def metric_key(name: str) -> str:
    """``name`` with the characters MLflow refuses in a metric key (anything but letters, digits,
    ``_ - . / : `` and space) replaced by ``_``, e.g. a row called ``w/o L_dim (x+y)``."""
    key = re.sub(r"[^\w.\- :/]", "_", name)
    return re.sub(r"/{2,}", "/", key).strip("/")  # "a//b" and a leading "/" are refused as paths


def log_summary(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    """One value per key (step 0) on a parent run, so the runs table shows them as columns without
    expanding its children; NaN/inf (a row without a finished trial) is left out."""
    now = int(time.time() * 1000)
    items = [Metric(metric_key(k), float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))]
    for start in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[start:start + 500])


def set_description(client: MlflowClient, run_id: str, markdown: str, more: str = "") -> None:
    """The run's description (its overview page renders it as Markdown). MLflow silently cuts a tag
    value at ``MAX_NOTE_LEN`` characters, so a longer text is cut here, saying so and where ``more``
    is (e.g. the artifact with the full table)."""
    if len(markdown) > MAX_NOTE_LEN:
        tail = f"\n\n… (cut at {MAX_NOTE_LEN} characters; the full text is in {more or 'the artifacts'})"
        markdown = markdown[:MAX_NOTE_LEN - len(tail)] + tail
    client.set_tag(run_id, NOTE_TAG, markdown)


def ui_path(experiment_id: str, run_id: str | None = None, view: str | None = None,
            charts: bool = False) -> str:
    """Where the MLflow UI shows an experiment's runs (or one run), relative to the UI's root, e.g.
    ``#/experiments/1/runs?workflowType=machine_learning``: in the "Model training" mode, so it never
    opens on the GenAI overview; ``view`` a shared view (``share_view``); ``charts`` its chart tab."""
    path = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    query = [f"viewStateShareKey={quote(view)}"] if view else []
    query += [UI_TRAINING] + (["compareRunsMode=CHART"] if charts else [])
    return f"{path}?{'&'.join(query)}"


def share_view(client: MlflowClient, experiment_id: str, key: str, state: dict) -> None:
    """Store a runs-page view (search filter, columns, grouping, chart filter) under ``key`` the way
    the UI's own "Share" button does, as an experiment tag; ``ui_path(..., view=key)`` opens it.
    ``state`` uses the UI's names: ``searchFilter``, ``selectedColumns``, ``groupBy``,
    ``runsHiddenMode``, ``chartsSearchFilter`` (MLflow 3.17; unknown keys are ignored by the UI)."""
    client.set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + key, json.dumps(state))


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
    artifacts. Returns the run id, or its buffer key if MLflow is unreachable just now (its events
    wait in ``folder``, ``study/tracking_buffer.py``)."""
    outbox = Outbox(study.tracking.uri, study.tracking.experiment, folder)
    tags = {"study": study.name, "method": study.method, "kind": kind, "git_commit": git_commit(),
            "study_dir": str(folder), **(extra_tags or {})}
    run = outbox.create_run(run_name, tags)
    params = flatten(study.model_dump(mode="json"))
    outbox.log(run, params={**params, **{f"env.{k}": v for k, v in environment().items()}})
    for path in files:
        outbox.log_artifact(run, path)
    return run


def close_parent(uri: str, experiment: str, folder: Path, parent: str, status: str | None = "FINISHED",
                 files: list[Path] = ()) -> str | None:
    """Log ``files`` to the parent run and end it with ``status`` (None: leave it open, e.g. an
    interrupted study), through ``folder``'s buffer: an unreachable MLflow delays this instead of
    failing the command. Returns the line to print if events are still kept, else None."""
    outbox = Outbox(uri, experiment, folder)
    for path in files:
        outbox.log_artifact(parent, path)
    if status is not None:
        outbox.set_status(parent, status)
    return outbox.close()


def fail_open_runs(client_or_uri: MlflowClient | str, experiment: str, parent_run_id: str, error: str = "",
                   folder: Path | None = None) -> None:
    """After a command failed: FAILED on its parent run and on every child still RUNNING (a failed
    ``run`` or ``ablate`` used to leave them RUNNING), the parent tagged with ``error``. Never raises
    (the command's own error is the one to show): with ``folder`` (the study directory) an
    unreachable MLflow gets the change kept in its buffer and sent later; without, a warning."""
    uri = client_or_uri.tracking_uri if isinstance(client_or_uri, MlflowClient) else client_or_uri
    if folder is not None:
        Outbox(uri, experiment, folder).fail_open(parent_run_id, error)
        return
    try:
        with short_retries():
            client = client_or_uri if isinstance(client_or_uri, MlflowClient) else client_for(uri, experiment)[0]
            fail_open(client, client.get_run(parent_run_id).info.experiment_id, parent_run_id, error)
    except Exception as err:  # noqa: BLE001
        print(f"warning: MLflow run {parent_run_id} not marked FAILED: {one_line(err)}", file=sys.stderr)


def short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


class TrialRuns:
    """One MLflow child run per trial under the study's parent run (Ray-free; ``study/tuner.py``
    forwards Tune's callback events here).

    Ray's ``MLflowLoggerCallback`` has no parent/child runs and duplicates runs after
    ``Tuner.restore``. Here the trial -> run map is part of Tune's experiment state
    (``get_state``/``set_state``), so a resumed study keeps writing to the same runs.
    Every write goes through an ``Outbox`` (``study/tracking_buffer.py``): nothing here raises into
    Tune, and while MLflow is unreachable the events wait in the study folder (``attach``).
    Subclasses (the ablation's) change only ``run_name``, ``trial_tags`` and ``trial_params``.
    """

    def __init__(self, uri: str, experiment: str, parent_run_id: str, study_name: str, method: str,
                 fixed_params: dict[str, str], epochs: int, folder: Path | None = None,
                 schedule: tuple[str, ...] = ()):
        self.uri, self.experiment = uri, experiment
        self.parent_run_id, self.study_name, self.method = parent_run_id, study_name, method
        self.fixed_params, self.epochs = fixed_params, epochs
        # Config keys a trial may change while it trains (PBT): logged every epoch as ``hp/<name>``.
        self.schedule = schedule
        self.runs: dict[str, str] = {}  # trial id -> MLflow run id (a buffer key until it is sent)
        self.numbers: dict[str, int] = {}
        self.last_epoch: dict[str, int] = {}
        self.nodes: dict[str, str] = {}  # trial id -> the Ray node its run's ``node_id`` tag names
        self.outbox = Outbox(uri, experiment, folder)

    def attach(self, folder: str | Path) -> None:
        """Keep events in ``folder`` (the study directory) while MLflow is unreachable."""
        self.outbox.attach(folder)

    def close(self) -> str | None:
        """At the end of the Tune run: send what is kept; the line to print if some is still kept."""
        return self.outbox.close()

    def get_state(self) -> dict:
        runs = {trial: self.outbox.resolved(run) for trial, run in self.runs.items()}
        return {"runs": runs, "numbers": self.numbers, "last_epoch": self.last_epoch}

    def set_state(self, state: dict) -> None:
        self.runs, self.numbers = dict(state["runs"]), dict(state["numbers"])
        self.last_epoch = dict(state.get("last_epoch", {}))

    def started(self, trial_id: str, config: dict) -> None:
        if trial_id in self.runs:  # restored or retried: keep writing to its run
            self.outbox.log(self.runs[trial_id], tags={"status": results.INCOMPLETE})
            self.outbox.set_status(self.runs[trial_id], "RUNNING")  # after a fail_open_runs
            return
        number = self.numbers.setdefault(trial_id, len(self.numbers))
        self.runs[trial_id] = run = self.outbox.create_run(self.run_name(config, number), {
            "mlflow.parentRunId": self.parent_run_id, "study": self.study_name, "method": self.method,
            "trial_id": trial_id, "trial_number": str(number), "status": results.INCOMPLETE,
            **({WARM_START_KEY: str(config[WARM_START_KEY])} if WARM_START_KEY in config else {}),
            **self.trial_tags(config)})
        self.outbox.log(run, params=self.trial_params(config))

    # What a child run is called and records; the ablation's subclass overrides these.
    def run_name(self, config: dict, number: int) -> str:
        label = " ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in config.items())
        return f"{self.method}-{number:03d} {label}".strip()

    def trial_tags(self, config: dict) -> dict[str, str]:
        return {}

    def trial_params(self, config: dict) -> dict[str, str]:
        return {**self.fixed_params, **{k: str(v) for k, v in config.items()}}

    def reported(self, trial_id: str, result: dict) -> None:
        run = self.runs.get(trial_id)
        if run is None:
            return
        step = int(result.get("training_iteration", 0))
        metrics = {k: v for k, v in result.items() if k not in SKIP_METRICS and k != "config"
                   and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        config = result.get("config") or {}  # Tune's copy of the trial's config as it was for this epoch
        metrics.update({f"hp/{name}": float(config[name]) for name in self.schedule if name in config})
        node = str(result.get("node_id", "unknown"))
        tags = {} if self.nodes.get(trial_id) == node else {"node_id": node}  # a retry may move it
        self.nodes[trial_id] = node
        self.outbox.log(run, metrics=metrics, step=step, tags=tags)
        self.last_epoch[trial_id] = step

    def completed(self, trial_id: str) -> None:
        """Tune ended the trial without an error: all epochs, or stopped early by the scheduler."""
        run = self.runs.get(trial_id)
        if run is None:
            return
        done = self.last_epoch.get(trial_id, 0)
        status = results.trial_status(False, done, self.epochs, live=False)
        self.outbox.log(run, tags={"status": status, "epochs": str(done)})
        self.outbox.set_status(run, "FINISHED")

    def failed(self, trial_id: str, error: str) -> None:
        run = self.runs.get(trial_id)
        if run is None:
            return
        self.outbox.log(run, tags={"status": results.FAILED, "error": error})
        self.outbox.set_status(run, "FAILED")


def mark_pareto(client: MlflowClient, parent: str, trial_ids: list[str]) -> None:
    """Several objectives: the parent run tagged with the Pareto set (``pareto_trial_ids``, best first
    by the first objective) and each of those trials' child runs with ``pareto=true``."""
    client.set_tag(parent, "pareto_trial_ids", ",".join(trial_ids))
    client.log_metric(parent, "pareto_size", float(len(trial_ids)))
    experiment_id = client.get_run(parent).info.experiment_id
    for run in client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"):
        if run.data.tags.get("trial_id") in trial_ids:
            client.set_tag(run.info.run_id, "pareto", "true")


def mark_best(client: MlflowClient, parent: str, trial_id: str) -> None:
    """Tag the parent run with the best trial (``best_trial_id``, ``best_run_id``) and that trial's
    child run with ``best=true``."""
    client.set_tag(parent, "best_trial_id", trial_id)
    experiment_id = client.get_run(parent).info.experiment_id
    for run in client.search_runs([experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{parent}' and tags.trial_id = '{trial_id}'")):
        client.set_tag(run.info.run_id, "best", "true")
        client.set_tag(parent, "best_run_id", run.info.run_id)
