"""Paper-style ablation tables from per-trial results (pandas + scipy + statsmodels; no Ray, no MLflow).

Input: one row per trial with ``variant``, ``seed``, ``status`` and the trial's metrics: under
``select: best_val`` the ``best_*`` keys the loop carries (validation ``best_rsum`` …, test
``best_test_*``, COCO's 5-fold 1K ``best_test_1k_*``, and ``best_epoch``); under ``select: final``
the final epoch's ``rsum`` …, ``test_*``, ``test_1k_*``. Output: per block (test / 1K + 5K /
validation) a summary frame, index = variant, with ``<metric>_mean``, ``<metric>_std``, ``n``,
``n_pairs``, ``delta_rsum``, ``delta_ci_low``, ``delta_ci_high``, ``p_value``, ``p_holm``,
``significant`` and ``epoch_mean``, rendered as Markdown, LaTeX (booktabs) and CSV by
``study/ablation/render.py``.

Why paired: every row is trained with the same seeds, and a seed moves all rows together (same data
order, same initial encoder). Testing the per-seed differences removes that shared part; Welch's
unpaired test counts it as noise and misses real effects (``tests/test_ablation.py`` shows a case).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from study.results import RETRIEVAL
from trainables.errors import ConfigError

METRICS = RETRIEVAL  # the table's columns, in paper order
ALPHA = 0.05  # family-wise level of the Holm-corrected paired test that sets the mark
CONFIDENCE = 0.95  # of the interval on Δ rSum
BEST_VAL, FINAL = "best_val", "final"  # ablation.select: which epoch's test metrics a trial contributes
SELECTS = (BEST_VAL, FINAL)
SUMMARY_COLUMNS = (*[f"{m}_{s}" for m in METRICS for s in ("mean", "std")], "n", "n_pairs", "delta_rsum",
                   "delta_ci_low", "delta_ci_high", "p_value", "p_holm", "significant", "epoch_mean")


@dataclass(frozen=True)
class Block:
    """One group of rows of the table: which metric keys it reads and how the caption names it."""

    key: str  # short id, also the ``block`` column of the CSV: test | 1k | 5k | val
    title: str  # e.g. "1K test (5-fold average)"
    prefix: str  # metric key prefix: "best_test_" (best_val), "test_" (final); validation "best_" / ""
    select: str = FINAL  # best_val | final: which checkpoint the prefix reads

    @property
    def epoch_key(self) -> str:
        """The trial column holding the epoch the metrics come from."""
        return "best_epoch" if self.select == BEST_VAL else "epochs"


@dataclass(frozen=True)
class Paired:
    """The paired comparison of one row with the reference row (NaN where it is undefined)."""

    n_pairs: int  # seeds both rows finished
    delta: float  # mean of the per-seed differences row − reference
    ci_low: float
    ci_high: float
    p_value: float  # two-sided paired t-test


def blocks_of(trials: pd.DataFrame, select: str) -> list[Block]:
    """Test-split blocks when the trials reported test metrics (COCO: 1K and 5K), else validation.

    ``select`` picks the keys: ``best_test_`` / ``best_test_1k_`` / ``best_`` (the epoch with the best
    validation rSum) or ``test_`` / ``test_1k_`` / ```` (the final epoch)."""
    if select not in SELECTS:
        raise ConfigError(f"ablation.select is {select!r}; use one of {', '.join(SELECTS)}")
    best = "best_" if select == BEST_VAL else ""
    test, one_k = f"{best}test_", f"{best}test_1k_"
    if f"{one_k}rsum" in trials and trials[f"{one_k}rsum"].notna().any():
        return [Block("1k", "1K test (5-fold average)", one_k, select), Block("5k", "5K test", test, select)]
    if f"{test}rsum" in trials and trials[f"{test}rsum"].notna().any():
        return [Block("test", "test split", test, select)]
    return [Block("val", "validation split (no test split)", best, select)]


def paired_test(sample: np.ndarray, reference: np.ndarray) -> Paired:
    """Paired t-test (``scipy.stats.ttest_rel``, two-sided) of ``sample`` against ``reference``,
    aligned by seed (NaN entries = a seed one side did not finish, dropped), with the 95 % CI of the
    mean difference from the same result.

    Undefined, so p and CI are NaN: fewer than 2 pairs, or per-seed differences that are all equal
    (zero variance: t is 0/0 or ±inf, and scipy would warn of precision loss)."""
    sample, reference = np.asarray(sample, float), np.asarray(reference, float)
    both = ~(np.isnan(sample) | np.isnan(reference))
    sample, reference = sample[both], reference[both]
    differences = sample - reference
    delta = float(differences.mean()) if len(differences) else float("nan")
    if len(differences) < 2 or np.allclose(differences, delta, rtol=1e-9, atol=1e-9):
        return Paired(len(differences), delta, float("nan"), float("nan"), float("nan"))
    result = stats.ttest_rel(sample, reference)
    ci = result.confidence_interval(CONFIDENCE)
    return Paired(len(differences), delta, float(ci.low), float(ci.high), float(result.pvalue))


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (``statsmodels`` ``multipletests(method="holm")``) over the
    defined ones; NaN (no test) stays NaN and is not part of the family."""
    p_values = np.asarray(p_values, float)
    adjusted = np.full_like(p_values, np.nan)
    defined = ~np.isnan(p_values)
    if defined.any():
        # Its Holm branch calls gc.collect(), which walks every object torch and pandas made
        # (0.5 s a call here); frozen objects are skipped, and unfreeze hands them back unchanged.
        gc.freeze()
        try:
            adjusted[defined] = multipletests(p_values[defined], method="holm")[1]
        finally:
            gc.unfreeze()
    return adjusted


def reference_of(order: list[str]) -> str:
    """The row every Δ is taken against: ``full`` when it is in the table, else the first row."""
    return "full" if "full" in order else order[0]


def block_values(trials: pd.DataFrame, block: Block) -> pd.DataFrame:
    """Completed trials: ``variant``, ``seed``, the block's metrics under plain names, ``epoch``."""
    done = trials[trials["status"] == "completed"] if "status" in trials else trials
    columns = {block.prefix + m: m for m in METRICS} | {block.epoch_key: "epoch"}
    values = done.reindex(columns=["variant", "seed", *columns]).rename(columns=columns)
    repeated = values.dropna(subset=["seed"]).duplicated(["variant", "seed"])
    if repeated.any():
        first = values[repeated.reindex(values.index, fill_value=False)].iloc[0]
        raise ConfigError(f"results.csv has more than one completed trial of row {first['variant']!r} "
                          f"seed {first['seed']}: keep one per row and seed")
    return values


def comparisons(values: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Per row: the paired test of its per-seed rSum against the reference row's, and Holm's
    correction across the block's non-reference rows. The reference row gets Δ 0, n_pairs = its
    seeds and NaN p / CI."""
    reference = reference_of(order)
    by_seed = values.dropna(subset=["seed"]).pivot(index="seed", columns="variant", values="rsum")
    by_seed = by_seed.reindex(columns=order)
    rows = {}
    for name in order:
        if name == reference:
            n = int(by_seed[name].notna().sum())
            rows[name] = Paired(n, 0.0 if n else float("nan"), float("nan"), float("nan"), float("nan"))
        else:
            rows[name] = paired_test(by_seed[name].to_numpy(), by_seed[reference].to_numpy())
    out = pd.DataFrame([vars(rows[name]) for name in order], index=order)
    out = out.rename(columns={"delta": "delta_rsum", "ci_low": "delta_ci_low", "ci_high": "delta_ci_high"})
    others = out.index != reference
    out["p_holm"] = np.nan
    out.loc[others, "p_holm"] = holm(out.loc[others, "p_value"].to_numpy(float))
    out["n_pairs"] = out["n_pairs"].astype(int)
    return out


def summarise(trials: pd.DataFrame, order: list[str], block: Block) -> pd.DataFrame:
    """Mean ± std over seeds of each metric per variant (in ``order``), Δ rSum with its 95 % CI, the
    paired test against the reference row with Holm's correction, and the mean selected epoch. Only
    completed trials count; a variant without one is all NaN.

    ``delta_rsum`` is the mean per-seed difference over the seeds both rows finished (it equals the
    difference of the row means when every seed finished), so it is the centre of its CI."""
    values = block_values(trials, block)
    grouped = values.groupby("variant")
    metrics = grouped[list(METRICS)]
    summary = pd.concat([metrics.mean().add_suffix("_mean"), metrics.std(ddof=1).add_suffix("_std")], axis=1)
    summary = summary.reindex(order)
    summary["n"] = grouped["rsum"].count().reindex(order).fillna(0).astype(int)
    summary = summary.join(comparisons(values, order))
    summary["significant"] = (summary["p_holm"] < ALPHA).astype(bool)
    epochs = pd.to_numeric(values["epoch"], errors="coerce")
    summary["epoch_mean"] = epochs.groupby(values["variant"]).mean().reindex(order)
    summary.index.name = "variant"
    return summary[list(SUMMARY_COLUMNS)]


def tidy(summaries: dict[Block, pd.DataFrame]) -> pd.DataFrame:
    """All blocks as one long CSV-ready frame (a ``block`` column, one row per block × variant)."""
    frames = [frame.reset_index().assign(block=block.key) for block, frame in summaries.items()]
    out = pd.concat(frames, ignore_index=True)
    return out[["block", *[c for c in out.columns if c != "block"]]]


def checkpoint_rule(select: str) -> str:
    if select == BEST_VAL:
        return ("at the epoch with the best validation rSum of each run (Epoch = the mean selected epoch "
                "per row)")
    return "at the final epoch"


def caption(method: str, dataset: str, seeds: list[int], blocks: list[Block], order: list[str],
            summaries: dict[Block, pd.DataFrame]) -> str:
    """Plain-text caption: what the cells are, which checkpoint, over which seeds, what Δ, its CI and
    the mark mean, and which rows could not be tested."""
    reference = reference_of(order)
    where = " and ".join(b.title for b in blocks)
    text = (f"Ablation of {method} on {dataset}: R@K (%) and rSum on the {where}, "
            f"{checkpoint_rule(blocks[0].select)}, ")
    if len(seeds) > 1:
        text += (f"mean ± std over {len(seeds)} seeds ({', '.join(map(str, seeds))}). Δ rSum is the mean "
                 f"per-seed difference from {reference}, with its {CONFIDENCE:.0%} CI. † marks a row whose "
                 f"paired t-test on the per-seed rSum differences (two-sided) gives p < {ALPHA:g} after "
                 f"Holm correction across the block's rows compared with {reference}.")
    else:
        text += (f"one run per row (seed {seeds[0]}). Δ rSum is relative to {reference}; the paired test "
                 "and its CI need at least 2 seeds, so no p-value or CI is given.")
    frames = summaries.values()
    short = sorted({name for frame in frames for name, n in frame["n"].items() if n < len(seeds)})
    if short:
        text += " Fewer seeds finished for: " + ", ".join(short) + "."
    untested = list(dict.fromkeys(name for frame in frames for name, row in frame.iterrows()
                                  if name != reference and np.isnan(row["p_value"])))
    if len(seeds) > 1 and untested:
        text += (" No test (fewer than 2 seeds shared with " + reference
                 + ", or identical per-seed differences) for: " + ", ".join(untested) + ".")
    return text
