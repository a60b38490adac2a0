"""Trials as plain records and pandas tables: one status vocabulary and one rule for the best trial.

``study/tuner.py`` turns Tune's result grid into ``TrialRecord``s; everything after that (the
study's and the ablation's ``results.csv``, the report, the MLflow tags, ``ablate --from-study``)
reads these records or the tables built from them, never Ray's objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from study.spaces import WARM_START_KEY
from trainables.errors import ConfigError

# The one vocabulary for a trial's status, in results.csv, reports and MLflow's ``status`` tag.
COMPLETED, EARLY_STOPPED, FAILED, INCOMPLETE = "completed", "early-stopped", "failed", "incomplete"
STATUSES = (COMPLETED, EARLY_STOPPED, FAILED, INCOMPLETE)

RETRIEVAL = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
GAP_METRICS = ("gap_centroid_dist", "alignment", "uniformity_img", "uniformity_txt")
STUDY_METRICS = (*RETRIEVAL, "loss", "gap_centroid_dist", "alignment", "training_iteration")
# validation, test (5K on COCO), COCO's 1K fold average: at the final epoch, then ``best_``: at the
# epoch with the best validation rSum so far (trainables/loop.py), what ``ablation.select: best_val`` reads.
ABLATION_PREFIXES = ("", "test_", "test_1k_", "best_", "best_test_", "best_test_1k_")
BEST_EPOCH = "best_epoch"  # the epoch the ``best_*`` metrics come from
BUDGET_PREFIX = "budget/"  # a loss term's share of the encoders' gradient norm (trainables/budget.py)
PARETO = "pareto"  # results.csv column of a multi-objective study: the trial is in the Pareto set
# A PBT study's per-epoch values of what it mutates, one JSON line per trial and epoch, written by the
# driver (Tune's result.json of a restarted trial can lose its earlier lines, see study/tuner.py).
SCHEDULES_FILE = "schedules.jsonl"


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the driver last saw it, free of Ray's types.

    ``live``: True while Tune still had the trial pending, running or paused (the driver stopped
    first), False once Tune ended it, None when unknown (read back from a trial directory).
    """

    trial_id: str
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # the last reported epoch
    error: str = ""  # the error's last line; empty when the trial did not fail
    live: bool | None = None

    @property
    def epochs(self) -> int:
        return int(self.metrics.get("training_iteration", 0) or 0)


def trial_status(failed: bool, epochs_done: int, epochs: int, live: bool | None) -> str:
    """``failed``; ``completed`` (every epoch reported); ``early-stopped`` (Tune ended it short of the
    budget without an error: the scheduler stopped it); else ``incomplete`` (interrupted or unknown)."""
    if failed:
        return FAILED
    if epochs_done >= epochs:
        return COMPLETED
    return EARLY_STOPPED if live is False else INCOMPLETE


def status_of(record: TrialRecord, epochs: int) -> str:
    return trial_status(bool(record.error), record.epochs, epochs, record.live)


def study_table(records: list[TrialRecord], params: dict, metric: str | list[str], epochs: int) -> pd.DataFrame:
    """A search study's ``results.csv``: id, status, warm-start label (when the study had any),
    searched values, last metrics (``metric``: one name or each objective's), error line."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    warm = any(WARM_START_KEY in record.config for record in records)
    rows = []
    for record in records:
        row = {"trial_id": record.trial_id, "status": status_of(record, epochs)}
        if warm:
            row[WARM_START_KEY] = record.config.get(WARM_START_KEY, "")
        row.update({name: record.config.get(name) for name in params})
        row.update({key: record.metrics[key] for key in (*STUDY_METRICS, *metrics) if key in record.metrics})
        row.update({key: value for key, value in record.metrics.items() if key.startswith(BUDGET_PREFIX)})
        row["epochs"] = record.epochs
        row["node_id"] = record.metrics.get("node_id", "")
        row["error"] = record.error
        rows.append(row)
    return pd.DataFrame(rows)


def ablation_metric(key: str) -> bool:
    """Retrieval metrics on every split at the final and the best-validation epoch (and that epoch),
    the modality-gap diagnostics, the loss and the term budget."""
    return key in ("loss", BEST_EPOCH) or key.startswith(BUDGET_PREFIX) or any(
        key == p + m for p in ABLATION_PREFIXES for m in RETRIEVAL + GAP_METRICS)


def ablation_table(records: list[TrialRecord], jobs: dict[str, dict], epochs: int) -> pd.DataFrame:
    """An ablation's ``results.csv``: id, row, seed, the row's method, status, the last report's
    metrics (final-epoch and best-validation-epoch ones)."""
    rows = []
    for record in records:
        variant = record.config.get("variant")
        row = {"trial_id": record.trial_id, "variant": variant, "seed": record.config.get("seed"),
               "method": jobs.get(variant, {}).get("method", ""), "status": status_of(record, epochs),
               "epochs": record.epochs}
        row.update({key: value for key, value in record.metrics.items() if ablation_metric(key)})
        row["error"] = record.error
        rows.append(row)
    table = pd.DataFrame(rows)
    if "seed" in table:  # a trial that never started has no config: keep the column integer
        table["seed"] = table["seed"].astype("Int64")
    return table


def is_finished(table: pd.DataFrame, expected: int) -> bool:
    """Every expected trial is there and none is still incomplete."""
    return len(table) >= expected and not (table["status"] == INCOMPLETE).any()


def judged(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """The trials a best trial or a Pareto set is chosen from: the completed ones that reported every
    metric, or (when none completed) all that reported them, since an early-stopped trial was judged
    on fewer epochs."""
    reported = table.dropna(subset=metrics) if set(metrics) <= set(table.columns) else table.iloc[0:0]
    completed = reported[reported["status"] == COMPLETED]
    return completed if len(completed) else reported


def best_trial(table: pd.DataFrame, metric: str, mode: str) -> dict | None:
    """The best trial by ``metric`` among the ``judged`` trials; None if none reported it."""
    pool = judged(table, [metric])
    if not len(pool):
        return None
    return pool.sort_values(metric, ascending=mode == "min", kind="stable").iloc[0].to_dict()


# --------------------------------------------------------------------------------------------------
# Several objectives: the Pareto set instead of one best trial
# --------------------------------------------------------------------------------------------------


def non_dominated(values: np.ndarray, maximize: list[bool]) -> np.ndarray:
    """``values`` [n, k] (one row per trial, one column per objective) -> bool [n]: no other row is at
    least as good in every objective and better in one. Equal rows are all kept."""
    signed = np.where(maximize, 1.0, -1.0) * np.asarray(values, dtype=float)  # larger is better everywhere
    at_least = (signed[None, :, :] >= signed[:, None, :]).all(axis=2)  # [i, j]: j is as good as i everywhere
    better = (signed[None, :, :] > signed[:, None, :]).any(axis=2)  # [i, j]: j beats i somewhere
    return ~(at_least & better).any(axis=1)


def pareto_column(table: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.Series:
    """True for the trials in the Pareto set of ``objectives`` [(metric, mode)] among the ``judged``
    trials; False for every other row (not judged, or dominated)."""
    names = [name for name, _ in objectives]
    pool = judged(table, names)
    mask = pd.Series(False, index=table.index)
    if len(pool):
        mask[pool.index] = non_dominated(pool[names].to_numpy(), [mode == "max" for _, mode in objectives])
    return mask


def pareto_trials(table: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """The Pareto set, best first by the first objective. Read from results.csv's ``pareto`` column
    when it has one (what the study marked), else computed."""
    if PARETO in table:
        marked = table[table[PARETO].astype(str).str.lower().isin(("true", "1", "1.0"))]
    else:
        marked = table[pareto_column(table, objectives)]
    first, mode = objectives[0]
    return marked.sort_values(first, ascending=mode == "min", kind="stable")


def pick_trial(table: pd.DataFrame, objectives: list[tuple[str, str]], rule: str | None) -> tuple[dict, str]:
    """The trial ``rule`` names, and the rule in words. Rules: ``best:METRIC`` (best by that objective:
    within the Pareto set when the study has several objectives), ``trial:ID`` (that trial). None =
    ``best:`` the first objective. A bad rule or an empty pool is a one-line ConfigError."""
    modes = dict(objectives)
    several = len(objectives) > 1
    kind, _, value = (rule or f"best:{objectives[0][0]}").partition(":")
    pool = pareto_trials(table, objectives) if several else judged(table, [objectives[0][0]])
    where = "the Pareto set" if several else "the finished trials"
    if kind == "trial" and value:
        chosen = table[table["trial_id"].astype(str) == value]
        if chosen.empty:
            raise ConfigError(f"--pick {rule}: no trial {value!r} in the study; its trials: "
                              f"{', '.join(map(str, table['trial_id']))}")
        return chosen.iloc[0].to_dict(), f"trial {value}" + ("" if value in set(pool["trial_id"].astype(str))
                                                              else f" (not in {where})")
    if kind != "best" or value not in modes:
        raise ConfigError(f"--pick {rule!r}: expected best:METRIC (METRIC one of {', '.join(modes)}) or trial:ID")
    if pool.empty:
        raise ConfigError(f"--pick {rule or 'best'}: no trial finished with {', '.join(modes)}; nothing to take")
    best = pool.sort_values(value, ascending=modes[value] == "min", kind="stable").iloc[0].to_dict()
    return best, f"best {value} in {where} ({len(pool)} trial(s))"
