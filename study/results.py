"""A study's trials as one pandas table (``results.csv``)."""

from __future__ import annotations

import pandas as pd

KEEP_METRICS = ("rsum", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "loss",
                "gap_centroid_dist", "alignment", "training_iteration")


def tune_states(grid) -> dict[str, str]:
    """Tune's own status per trial id (TERMINATED, ERROR, RUNNING, PENDING, PAUSED)."""
    analysis = getattr(grid, "_experiment_analysis", None)  # ResultGrid exposes no public per-trial status
    return {trial.trial_id: trial.status for trial in getattr(analysis, "trials", [])}


def trial_status(result, state: str | None, epochs: int) -> str:
    if result.error is not None or state == "ERROR":
        return "failed"
    if state in ("RUNNING", "PENDING", "PAUSED"):
        return "interrupted"
    done = int((result.metrics or {}).get("training_iteration", 0))
    return "completed" if done >= epochs else "early-stopped"


def results_table(grid, params: dict, metric: str, epochs: int) -> pd.DataFrame:
    """One row per trial: id, status, searched params, last reported metrics, error line."""
    rows = []
    states = tune_states(grid)
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        row = {"trial_id": metrics.get("trial_id") or _trial_id(result.path)}
        row["status"] = trial_status(result, states.get(row["trial_id"]), epochs)
        row.update({name: config.get(name) for name in params})
        row.update({key: metrics.get(key) for key in (*KEEP_METRICS, metric) if key in metrics})
        row["epochs"] = metrics.get("training_iteration", 0)
        row["node_id"] = metrics.get("node_id", "")
        row["error"] = str(result.error).strip().splitlines()[-1][:300] if result.error is not None else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _trial_id(path: str | None) -> str:
    return (path or "").rstrip("/").rsplit("trial_", 1)[-1]
