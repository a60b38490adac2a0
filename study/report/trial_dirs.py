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


def read_schedules(path: Path, trial_ids: list[str], names: list[str]) -> pd.DataFrame:
    """A PBT study's ``schedules.jsonl`` (``study/tuner.py`` ``ScheduleCallback``) for ``trial_ids``, in
    that order: columns trial_id, epoch, the names, and ``changed`` (the values differ from the
    trial's previous epoch: PBT restarted it from a top trial's checkpoint with new values)."""
    lines = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a killed driver
            continue
    found = pd.DataFrame(lines, columns=["trial_id", "training_iteration", *names])
    rows = []
    for trial_id in trial_ids:
        own = found[found["trial_id"].astype(str) == str(trial_id)].drop_duplicates("training_iteration", keep="last")
        previous = None
        for _, line in own.sort_values("training_iteration").iterrows():
            values = {name: line[name] for name in names}
            rows.append({"trial_id": str(trial_id), "epoch": int(line["training_iteration"]), **values,
                         "changed": previous is not None and values != previous})
            previous = values
    return pd.DataFrame(rows, columns=["trial_id", "epoch", *names, "changed"])
