"""Trials read straight from Tune's trial directories (``trial_*/params.json`` + ``result.json``).

``results.csv`` is written when a study or ablation ends; a driver killed mid-run leaves none, but
every trial directory still holds its config and one JSON line per reported epoch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from study.results import trial_status


def last_result(path: Path) -> dict:
    """The last complete JSON line of ``result.json`` (a killed writer may leave a torn last line)."""
    for line in reversed(path.read_text().splitlines() if path.is_file() else []):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}


def read_trial_dirs(run_dir: Path, epochs: int) -> pd.DataFrame:
    """One row per ``trial_*`` directory: trial id, status, config values, last numeric metrics.

    Status (``study/results.py``): ``failed`` when Tune wrote an error file, ``completed`` when all
    ``epochs`` were reported, else ``incomplete``.
    """
    rows = []
    for trial in sorted(Path(run_dir).glob("trial_*")):
        params = trial / "params.json"
        config = json.loads(params.read_text()) if params.is_file() else {}
        metrics = last_result(trial / "result.json")
        done = int(metrics.get("training_iteration", 0))
        # Tune's own record of early stopping lives in its experiment state, not in the trial directory.
        status = trial_status((trial / "error.txt").exists(), done, epochs, live=None)
        row = {"trial_id": trial.name.removeprefix("trial_"), "status": status, **config, "epochs": done}
        row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) and k not in row})
        rows.append(row)
    return pd.DataFrame(rows)
