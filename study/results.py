"""Trials as plain records and pandas tables: one status vocabulary and one rule for the best trial.

``study/tuner.py`` turns Tune's result grid into ``TrialRecord``s; everything after that (the
study's and the ablation's ``results.csv``, the report, the MLflow tags, ``ablate --from-study``)
reads these records or the tables built from them, never Ray's objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

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


def study_table(records: list[TrialRecord], params: dict, metric: str, epochs: int) -> pd.DataFrame:
    """A search study's ``results.csv``: id, status, searched values, last metrics, error line."""
    rows = []
    for record in records:
        row = {"trial_id": record.trial_id, "status": status_of(record, epochs)}
        row.update({name: record.config.get(name) for name in params})
        row.update({key: record.metrics[key] for key in (*STUDY_METRICS, metric) if key in record.metrics})
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


def best_trial(table: pd.DataFrame, metric: str, mode: str) -> dict | None:
    """The best trial by ``metric``: among completed trials, or (when none completed) among those that
    reported it at all, since an early-stopped trial was judged on fewer epochs. None if none did."""
    reported = table.dropna(subset=[metric]) if metric in table else table.iloc[0:0]
    completed = reported[reported["status"] == COMPLETED]
    pool = completed if len(completed) else reported
    if not len(pool):
        return None
    return pool.sort_values(metric, ascending=mode == "min", kind="stable").iloc[0].to_dict()
