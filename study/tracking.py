"""MLflow on the driver only (workers report through Ray). sqlite store, artifacts beside it."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

MAX_PARAM_LEN = 6000


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
    import optuna
    import ray
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "optuna": optuna.__version__, "platform": platform.platform()}


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
