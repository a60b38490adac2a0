"""Paper-style ablation tables from per-trial results (pandas + scipy; no Ray, no MLflow).

Input: one row per trial with ``variant``, ``seed``, ``status`` and the trial's final-epoch metrics
(``i2t_r1`` … ``rsum`` on validation, ``test_*`` on the test split, ``test_1k_*`` for COCO's 5-fold
1K average). Output: per block (test / 1K + 5K / validation) a summary frame, index = variant, with
``<metric>_mean``, ``<metric>_std``, ``n``, ``delta_rsum``, ``p_value`` and ``significant``, rendered
as Markdown, LaTeX (booktabs) and CSV by ``study/ablation/render.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from study.results import RETRIEVAL

METRICS = RETRIEVAL  # the table's columns, in paper order
ALPHA = 0.05  # significance level of the Welch test that sets the mark


@dataclass(frozen=True)
class Block:
    """One group of rows of the table: which metric keys it reads and how the caption names it."""

    key: str  # short id, also the ``block`` column of the CSV: test | 1k | 5k | val
    title: str  # e.g. "1K test (5-fold average)"
    prefix: str  # metric key prefix: "test_", "test_1k_" or "" (validation)


def blocks_of(trials: pd.DataFrame) -> list[Block]:
    """Test-split blocks when the trials reported test metrics (COCO: 1K and 5K), else validation."""
    if "test_1k_rsum" in trials and trials["test_1k_rsum"].notna().any():
        return [Block("1k", "1K test (5-fold average)", "test_1k_"), Block("5k", "5K test", "test_")]
    if "test_rsum" in trials and trials["test_rsum"].notna().any():
        return [Block("test", "test split", "test_")]
    return [Block("val", "validation split (no test split)", "")]


def welch_p(sample: np.ndarray, reference: np.ndarray) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances); NaN when it is undefined
    (fewer than two seeds on a side, or both sides constant and equal)."""
    sample, reference = np.asarray(sample, float), np.asarray(reference, float)
    if len(sample) < 2 or len(reference) < 2:
        return float("nan")
    with warnings.catch_warnings():  # identical seeds give a precision warning and p = NaN or 1
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(sample, reference, equal_var=False).pvalue)


def reference_of(order: list[str]) -> str:
    """The row every Δ is taken against: ``full`` when it is in the table, else the first row."""
    return "full" if "full" in order else order[0]


def summarise(trials: pd.DataFrame, order: list[str], block: Block) -> pd.DataFrame:
    """Mean ± std over seeds of each metric per variant (in ``order``), Δ rSum and the Welch test
    against the reference row. Only completed trials count; a variant without one is all NaN."""
    done = trials[trials["status"] == "completed"] if "status" in trials else trials
    columns = {m: block.prefix + m for m in METRICS}
    values = done.reindex(columns=["variant", *columns.values()]).rename(columns={v: k for k, v in columns.items()})
    grouped = values.groupby("variant")[list(METRICS)]
    mean, std = grouped.mean().add_suffix("_mean"), grouped.std(ddof=1).add_suffix("_std")
    summary = pd.concat([mean, std], axis=1).reindex(order)
    summary["n"] = values.groupby("variant")["rsum"].count().reindex(order).fillna(0).astype(int)
    reference = reference_of(order)
    summary["delta_rsum"] = summary["rsum_mean"] - summary.loc[reference, "rsum_mean"]
    ref_rsum = values.loc[values["variant"] == reference, "rsum"].dropna().to_numpy()
    summary["p_value"] = [
        float("nan") if name == reference
        else welch_p(values.loc[values["variant"] == name, "rsum"].dropna().to_numpy(), ref_rsum)
        for name in order]
    summary["significant"] = summary["p_value"] < ALPHA
    summary.index.name = "variant"
    return summary[[*[f"{m}_{s}" for m in METRICS for s in ("mean", "std")], "n", "delta_rsum", "p_value",
                    "significant"]]


def tidy(summaries: dict[Block, pd.DataFrame]) -> pd.DataFrame:
    """All blocks as one long CSV-ready frame (a ``block`` column, one row per block × variant)."""
    frames = [frame.reset_index().assign(block=block.key) for block, frame in summaries.items()]
    out = pd.concat(frames, ignore_index=True)
    return out[["block", *[c for c in out.columns if c != "block"]]]


def caption(method: str, dataset: str, seeds: list[int], blocks: list[Block], order: list[str],
            summaries: dict[Block, pd.DataFrame]) -> str:
    """Plain-text caption: what the cells are, over which seeds, and what the mark means."""
    reference = reference_of(order)
    where = " and ".join(b.title for b in blocks)
    text = f"Ablation of {method} on {dataset}: R@K (%) and rSum on the {where} at the final epoch, "
    if len(seeds) > 1:
        text += (f"mean ± std over seeds {', '.join(map(str, seeds))}. Δ rSum is relative to {reference}. "
                 f"† marks an rSum that differs from {reference} by Welch's t-test across seeds "
                 f"(unequal variances, two-sided, p < {ALPHA:g}).")
    else:
        text += (f"one run per row (seed {seeds[0]}). Δ rSum is relative to {reference}; "
                 "significance needs at least 2 seeds per row.")
    short = sorted({name for frame in summaries.values() for name, n in frame["n"].items() if n < len(seeds)})
    if short:
        text += " Fewer seeds finished for: " + ", ".join(short) + "."
    return text
