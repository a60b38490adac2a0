"""MLflow on the driver only (workers report through Ray). sqlite store, artifacts beside it."""

from __future__ import annotations

import logging
import os
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
