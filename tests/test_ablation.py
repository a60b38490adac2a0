"""Ablation tables: the table and its statistics on constructed trials (no Ray), their calibration
on simulated seeds, checkpoint selection in the loop, the plan's validation before Ray starts, and one
tiny real ablation (2 rows x 2 seeds) end to end."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy import stats

from study.ablation.output import write_tables
from study.ablation.plan import plan_ablation, seeds_override, select_rows
from study.ablation.render import display_frame, latex_escape, to_latex, to_markdown
from study.ablation.stats import (
    ALPHA, BEST_VAL, FINAL, METRICS, Block, blocks_of, caption, holm, paired_test, summarise, tidy,
)
from study.results import ablation_metric
from trainables.errors import ConfigError, DataError

TEST = Block("test", "test split", "test_")
ROWS = ["full", "w/o L_dim", "same", "base"]


def constructed_trials(rsum: dict[str, list[float]], prefix: str = "test_", seeds=None) -> pd.DataFrame:
    """One trial per (row, seed); R@K cells are rSum / 6 plus a per-metric offset so columns differ."""
    rows = []
    for variant, values in rsum.items():
        for seed, total in zip(seeds or range(len(values)), values):
            metrics = {f"{prefix}{m}": total / 6 + i for i, m in enumerate(METRICS[:-1])}
            metrics[f"{prefix}rsum"] = sum(metrics.values())
            rows.append({"trial_id": f"{variant}-{seed}", "variant": variant, "seed": seed,
                         "status": "completed", **metrics})
    return pd.DataFrame(rows)


@pytest.fixture
def trials() -> pd.DataFrame:
    # w/o L_dim: about 60 below full on every seed; same: identical to full; base: lower but noisy.
    return constructed_trials({"full": [300.0, 306.0, 303.0], "w/o L_dim": [240.5, 245.0, 243.5],
                               "same": [300.0, 306.0, 303.0], "base": [150.0, 230.0, 310.0]})


def rsum_of(trials: pd.DataFrame, name: str, prefix: str = "test_") -> np.ndarray:
    return trials[trials.variant == name].sort_values("seed")[f"{prefix}rsum"].to_numpy()


def test_means_stds_and_delta_match_numpy(trials):
    summary = summarise(trials, ROWS, TEST)
    assert list(summary.index) == ROWS
    for name in ROWS:
        rsum = rsum_of(trials, name)
        assert summary.loc[name, "rsum_mean"] == pytest.approx(rsum.mean())
        assert summary.loc[name, "rsum_std"] == pytest.approx(rsum.std(ddof=1))
        assert summary.loc[name, "n"] == 3 and summary.loc[name, "n_pairs"] == 3
    assert summary.loc["w/o L_dim", "delta_rsum"] == pytest.approx(
        rsum_of(trials, "w/o L_dim").mean() - rsum_of(trials, "full").mean())
    assert summary.loc["full", "delta_rsum"] == 0


def test_paired_test_with_holm_marks_the_clearly_different_row_only(trials):
    summary = summarise(trials, ROWS, TEST)
    full = rsum_of(trials, "full")
    for name in ("w/o L_dim", "base"):  # the numbers are scipy's paired t-test on the per-seed values
        result = stats.ttest_rel(rsum_of(trials, name), full)
        ci = result.confidence_interval(0.95)
        assert summary.loc[name, "p_value"] == pytest.approx(result.pvalue)
        assert (summary.loc[name, "delta_ci_low"], summary.loc[name, "delta_ci_high"]) == pytest.approx((ci.low, ci.high))
    # Holm over the two rows with a test ('same' has none): the smaller p doubled, the larger kept
    p = summary.loc[["w/o L_dim", "base"], "p_value"]
    assert summary.loc["w/o L_dim", "p_holm"] == pytest.approx(2 * p.min())
    assert summary.loc["base", "p_holm"] == pytest.approx(max(p.max(), 2 * p.min()))
    assert summary.loc["w/o L_dim", "significant"] and summary.loc["w/o L_dim", "p_holm"] < 0.01
    assert not summary.loc["same", "significant"] and np.isnan(summary.loc["same", "p_value"])
    assert not summary.loc["base", "significant"]  # lower mean but noisy: not significant with 3 seeds
    assert np.isnan(summary.loc["full", ["p_value", "p_holm", "delta_ci_low", "delta_ci_high"]].astype(float)).all()
    shown = display_frame(summary).set_index("Variant")
    assert shown.loc["w/o L_dim", "rSum"].endswith("†") and "†" not in shown.loc["same", "rSum"]
    low, high = summary.loc["w/o L_dim", ["delta_ci_low", "delta_ci_high"]]
    assert shown.loc["w/o L_dim", "Δ rSum vs full [95% CI]"] == f"−60.0 [−{-low:.1f}, −{-high:.1f}]"
    assert shown.loc["full", "Δ rSum vs full [95% CI]"] == "–"
    assert shown.loc["same", "Δ rSum vs full [95% CI]"] == "+0.0"  # no CI without a test


def test_pairs_are_matched_by_seed_and_only_where_both_rows_finished():
    trials = constructed_trials({"full": [300.0, 310.0, 305.0, 299.0], "row": [290.0, 303.0, 296.0, 280.0]},
                                seeds=[3, 1, 2, 0])
    trials = trials.sample(frac=1.0, random_state=0)  # order in the file says nothing
    trials.loc[(trials.variant == "full") & (trials.seed == 3), "status"] = "failed"  # reference lost seed 3
    trials = trials[~((trials.variant == "row") & (trials.seed == 0))]  # the row never ran seed 0
    summary = summarise(trials, ["full", "row"], TEST)
    row, full = (trials[(trials.variant == v) & trials.seed.isin([1, 2])].sort_values("seed").test_rsum.to_numpy()
                 for v in ("row", "full"))
    assert summary.loc["row", "n"] == 3 and summary.loc["full", "n"] == 3 and summary.loc["row", "n_pairs"] == 2
    assert summary.loc["row", "delta_rsum"] == pytest.approx((row - full).mean())  # seeds 1 and 2 only
    assert summary.loc["row", "p_value"] == pytest.approx(stats.ttest_rel(row, full).pvalue)


def test_fewer_than_two_pairs_and_constant_differences_give_no_test_without_warnings():
    trials = constructed_trials({"full": [300.0, 306.0, 303.0], "shifted": [290.0, 296.0, 293.0],
                                 "lonely": [250.0]}, seeds=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's precision-loss warning or a 0/0 would fail here
        summary = summarise(trials, ["full", "shifted", "lonely"], TEST)
        single = paired_test(np.array([1.0]), np.array([2.0]))
    assert summary.loc["shifted", "delta_rsum"] == pytest.approx(-10.0)
    # its one seed (0) against full's seed 0, not against full's mean over three seeds (−53)
    assert summary.loc["lonely", "n_pairs"] == 1 and summary.loc["lonely", "delta_rsum"] == pytest.approx(-50.0)
    for name in ("shifted", "lonely"):
        assert np.isnan(summary.loc[name, ["p_value", "p_holm", "delta_ci_low", "delta_ci_high"]].astype(float)).all()
        assert not summary.loc[name, "significant"]
    assert single.n_pairs == 1 and np.isnan(single.p_value) and np.isnan(single.ci_low)
    text = caption("dias", "synth", [0, 1, 2], [TEST], ["full", "shifted", "lonely"], {TEST: summary})
    assert "No test (fewer than 2 seeds shared with full, or identical per-seed differences) for: shifted, lonely" in text
    one_seed = caption("dias", "synth", [0], [TEST], ["full", "lonely"], {TEST: summary.loc[["full", "lonely"]]})
    assert "need at least 2 seeds, so no p-value or CI is given" in one_seed


def test_holm_is_statsmodels_over_the_defined_p_values():
    from statsmodels.stats.multitest import multipletests

    p = np.array([0.01, np.nan, 0.04, 0.03])
    adjusted = holm(p)
    assert np.isnan(adjusted[1])
    assert adjusted[[0, 2, 3]] == pytest.approx(multipletests([0.01, 0.04, 0.03], method="holm")[1])
    assert adjusted[[0, 2, 3]] == pytest.approx([0.03, 0.06, 0.06])  # 3·0.01, then max(2·0.03, 0.04·1)
    assert np.isnan(holm(np.array([np.nan]))).all()


def test_failed_trials_do_not_count(trials):
    trials.loc[trials.trial_id == "w/o L_dim-0", ["status", "test_rsum"]] = ["failed", 0.0]
    summary = summarise(trials, ROWS, TEST)
    assert summary.loc["w/o L_dim", "n"] == 2 and summary.loc["w/o L_dim", "rsum_mean"] == pytest.approx(
        trials.loc[trials.trial_id.isin(["w/o L_dim-1", "w/o L_dim-2"]), "test_rsum"].mean())
    text = caption("dias", "synth", [0, 1, 2], [TEST], ROWS, {TEST: summary})
    assert "Fewer seeds finished for: w/o L_dim" in text


def test_two_completed_trials_of_one_row_and_seed_are_a_one_line_error(trials):
    with pytest.raises(ConfigError, match="more than one completed trial of row 'full' seed 0") as err:
        summarise(pd.concat([trials, trials.iloc[:1]]), ROWS, TEST)
    assert "\n" not in str(err.value)


def test_blocks_follow_the_checkpoint_rule(trials):
    assert [(b.key, b.prefix) for b in blocks_of(trials, FINAL)] == [("test", "test_")]
    coco = pd.concat([trials, constructed_trials({"full": [1.0]}, prefix="test_1k_")])
    assert [(b.key, b.prefix) for b in blocks_of(coco, FINAL)] == [("1k", "test_1k_"), ("5k", "test_")]
    val = constructed_trials({"full": [1.0, 2.0], "base": [0.5, 0.7]}, prefix="")
    assert [b.prefix for b in blocks_of(val, FINAL)] == [""]
    best = pd.concat([constructed_trials({"full": [1.0]}, prefix=p) for p in ("best_test_1k_", "best_test_")])
    assert [(b.key, b.prefix, b.epoch_key) for b in blocks_of(best, BEST_VAL)] == [
        ("1k", "best_test_1k_", "best_epoch"), ("5k", "best_test_", "best_epoch")]
    assert [(b.key, b.prefix) for b in blocks_of(trials, BEST_VAL)] == [("val", "best_")]  # no best_test_*
    with pytest.raises(ConfigError, match="ablation.select is 'last'"):
        blocks_of(trials, "last")


def test_csv_contract_and_mean_selected_epoch(trials):
    trials["best_epoch"] = [3, 2, 3, 1, 1, 1, 3, 2, 3, 2, 2, 2]
    best = trials.rename(columns=lambda c: "best_" + c if c.startswith("test_") else c)
    (block,) = blocks_of(best, BEST_VAL)
    frame = tidy({block: summarise(best, ROWS, block)})
    assert list(frame.columns) == ["block", "variant", *[f"{m}_{s}" for m in METRICS for s in ("mean", "std")],
                                   "n", "n_pairs", "delta_rsum", "delta_ci_low", "delta_ci_high", "p_value",
                                   "p_holm", "significant", "epoch_mean"]
    assert list(frame.epoch_mean) == pytest.approx([8 / 3, 1.0, 8 / 3, 2.0])
    assert list(frame.significant) == list(frame.p_holm < ALPHA)
    shown = display_frame(summarise(best, ROWS, block), epoch=True).set_index("Variant")
    assert list(shown["Epoch"]) == ["2.7", "1.0", "2.7", "2.0"]


def test_write_tables_reads_the_stored_rule_and_old_metadata_means_final(trials, tmp_path):
    best = trials.copy()  # best_test_* = final test_* + 5, selected at epoch 2 of 3
    for m in METRICS:
        best[f"best_test_{m}"] = best[f"test_{m}"] + 5
    best["best_epoch"], best["epochs"] = 2, 3
    meta = {"name": "x-ablation", "method": "dias", "dataset": "synth", "rows": ROWS, "seeds": [0, 1, 2]}
    old, _ = write_tables(best, meta, tmp_path)  # no "select": an ablation.json from before it existed
    table = pd.read_csv(tmp_path / "ablation.csv")
    assert table.loc[0, "rsum_mean"] == pytest.approx(rsum_of(best, "full").mean(), abs=1e-3)
    assert table.loc[0, "epoch_mean"] == 3 and "at the final epoch" in old and "| Epoch" not in old
    new, _ = write_tables(best, meta | {"select": BEST_VAL}, tmp_path)
    table = pd.read_csv(tmp_path / "ablation.csv")
    assert table.loc[0, "rsum_mean"] == pytest.approx(rsum_of(best, "full", "best_test_").mean(), abs=1e-3)
    assert table.loc[0, "epoch_mean"] == 2
    assert "at the epoch with the best validation rSum" in new and "| Epoch" in new


def test_results_keep_the_best_validation_epoch_and_its_metrics():
    for key in ("best_epoch", "best_rsum", "best_i2t_r1", "best_test_rsum", "best_test_1k_t2i_r5",
                "rsum", "test_rsum", "test_1k_rsum"):
        assert ablation_metric(key), key
    assert not ablation_metric("best_lr") and not ablation_metric("lr")


# --------------------------------------------------------------------------------------------------
# Calibration on simulated per-seed results (numpy + the functions above)
# --------------------------------------------------------------------------------------------------

DRAWS = 2000


def binomial_band(rate: float, draws: int = DRAWS) -> tuple[float, float]:
    """The 99.8 % range of a rejection count at ``rate`` over ``draws`` independent draws, as a rate."""
    return stats.binom.ppf(0.001, draws, rate) / draws, stats.binom.ppf(0.999, draws, rate) / draws


def simulated_rows(rng, seeds: int, effects: list[float], seed_sd: float = 20.0, noise_sd: float = 2.0):
    """A reference row and one row per effect. Each seed moves every row by the same amount (data
    order, initial weights), which is why the rows are paired."""
    shared = 300.0 + rng.normal(0.0, seed_sd, seeds)
    reference = shared + rng.normal(0.0, noise_sd, seeds)
    return reference, [shared + effect + rng.normal(0.0, noise_sd, seeds) for effect in effects]


@pytest.mark.parametrize("seeds", [3, 5])
def test_null_rows_are_flagged_at_the_nominal_rate_and_holm_holds_the_family_rate(seeds):
    rng = np.random.default_rng(seeds)
    flagged = family_raw = family_holm = 0
    for _ in range(DRAWS):
        reference, rows = simulated_rows(rng, seeds, [0.0, 0.0, 0.0])
        p = np.array([paired_test(row, reference).p_value for row in rows])
        flagged += p[0] < ALPHA
        family_raw += (p < ALPHA).any()
        family_holm += (holm(p) < ALPHA).any()
    low, high = binomial_band(ALPHA)
    assert low <= flagged / DRAWS <= high  # an exact test: neither liberal nor conservative
    assert family_holm / DRAWS <= high
    assert family_raw / DRAWS > high  # three uncorrected tests per block would exceed 5 %


def test_a_planted_effect_is_flagged_with_its_sign_and_covered_by_the_ci():
    planted = -10.0
    rng = np.random.default_rng(1)
    covered = flagged = 0
    for _ in range(DRAWS):
        reference, (row,) = simulated_rows(rng, 5, [planted])
        result = paired_test(row, reference)
        covered += result.ci_low <= planted <= result.ci_high
        flagged += result.p_value < ALPHA and result.delta < 0
    low, high = binomial_band(0.95)
    assert low <= covered / DRAWS <= high  # the 95 % CI is a 95 % CI
    assert flagged / DRAWS > 0.95  # -10 against noise of sd 2 (differences: sd 2.8) over 5 seeds
    # and through the table: the row is marked with a negative Δ whose CI covers the planted value
    reference, (row, null) = simulated_rows(np.random.default_rng(2), 5, [planted, 0.0])
    trials = constructed_trials({"full": list(reference), "planted": list(row), "null": list(null)})
    summary = summarise(trials, ["full", "planted", "null"], TEST)
    assert summary.loc["planted", "significant"] and summary.loc["planted", "delta_rsum"] < 0
    assert summary.loc["planted", "delta_ci_low"] <= planted <= summary.loc["planted", "delta_ci_high"]
    assert not summary.loc["null", "significant"]


def test_pairing_finds_what_welch_misses_when_seeds_move_rows_together():
    rng = np.random.default_rng(3)
    paired = welch = 0
    for _ in range(200):
        reference, (row,) = simulated_rows(rng, 5, [-5.0], seed_sd=30.0, noise_sd=1.0)
        paired += paired_test(row, reference).p_value < ALPHA
        welch += stats.ttest_ind(row, reference, equal_var=False).pvalue < ALPHA
    assert paired / 200 > 0.9 and welch / 200 < 0.1


# --------------------------------------------------------------------------------------------------
# Checkpoint selection in the loop
# --------------------------------------------------------------------------------------------------


def test_checkpoint_metrics_carry_the_best_validation_epoch_and_test_it_only_when_it_improves():
    from trainables.loop import checkpoint_metrics

    calls = []

    def run_test():
        calls.append(len(history) + 1)
        return {"test_rsum": 10.0 * (len(history) + 1), "test_i2t_r1": 1.0}

    history = []
    for epoch, rsum in enumerate([5.0, 7.0, 7.0, 6.0], start=1):
        metrics = {"epoch": float(epoch), "rsum": rsum, **{m: 0.5 for m in METRICS[:-1]}}
        metrics |= checkpoint_metrics(metrics, history, epoch == 4, run_test)
        history.append(metrics)
    assert [m["best_epoch"] for m in history] == [1, 2, 2, 2]  # a tie is not an improvement
    assert [m["best_rsum"] for m in history] == [5.0, 7.0, 7.0, 7.0]
    assert [m["best_test_rsum"] for m in history] == [10.0, 20.0, 20.0, 20.0]
    assert calls == [1, 2, 4]  # improvements, and the last epoch's own test_*
    assert history[-1]["test_rsum"] == 40.0 and "test_rsum" not in history[2]
    # resumed from a checkpoint: the state comes from the restored history, not from memory
    resumed = checkpoint_metrics({"epoch": 5.0, "rsum": 6.5}, history, False, run_test)
    assert resumed["best_epoch"] == 2 and resumed["best_test_rsum"] == 20.0 and calls == [1, 2, 4]


def test_fit_reports_test_metrics_at_the_best_validation_epoch_across_a_resume(smoke_study, tmp_path):
    """best_epoch is the argmax of the per-epoch validation rSum, and best_test_* are the test
    metrics of the model saved at that epoch, evaluated again from its checkpoint."""
    from trainables.data import PrecompSplit
    from trainables.loop import CHECKPOINT_FILE, evaluate_test, fit
    from trainables.methods import build_model
    from trainables.reporters import LocalReporter
    from trainables.text_models import load_tokenizer

    fit(smoke_study("train.epochs=2", "data.max_images=150").job(), LocalReporter(tmp_path / "run", keep=5))
    job = smoke_study("train.epochs=3", "data.max_images=150").job()
    history = fit(job, LocalReporter(tmp_path / "run", keep=5))  # resumes at epoch 3
    rsums = [m["rsum"] for m in history]
    best = int(np.argmax(rsums)) + 1  # the first of equal maxima
    assert [int(m["best_epoch"]) for m in history] == [int(np.argmax(rsums[:k])) + 1 for k in range(1, 4)]
    assert history[-1]["best_epoch"] == best and history[-1]["best_rsum"] == max(rsums)
    test = PrecompSplit(job.data.root, job.data.test_split, job.data.max_images)
    model = build_model(job, test.feature_dim)
    state = torch.load(tmp_path / "run" / f"checkpoint_{best:04d}" / CHECKPOINT_FILE, weights_only=True)
    model.load_state_dict(state["model"])
    again = evaluate_test(model, job, test, load_tokenizer(job.model.text_encoder), torch.device("cpu"))
    for key, value in again.items():
        assert history[-1]["best_" + key] == pytest.approx(value, abs=1e-6), key
    # final-epoch test_* only where a run ended: epoch 2 (the first run's last) and 3
    assert ["test_rsum" in m for m in history] == [False, True, True]


def test_markdown_has_rows_in_order_and_the_columns(trials):
    summaries = {TEST: summarise(trials, ROWS, TEST)}
    text = to_markdown(summaries, caption("dias", "synth", [0, 1, 2], [TEST], ROWS, summaries))
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["Variant", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "rSum",
                      "Δ rSum vs full [95% CI]"]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ROWS
    assert "paired t-test on the per-seed rSum differences (two-sided)" in text and "Holm" in text
    assert "3 seeds (0, 1, 2)" in text and "95% CI" in text and "at the final epoch" in text


def test_coco_gets_a_1k_and_a_5k_block_in_every_format(trials):
    one_k_trials = constructed_trials({"full": [400.0, 406.0, 403.0], "w/o L_dim": [340.0, 346.0, 343.0],
                                       "same": [400.0, 406.0, 403.0], "base": [150.0, 230.0, 310.0]}, prefix="test_1k_")
    coco = trials.merge(one_k_trials.drop(columns="status"), on=["trial_id", "variant", "seed"])
    summaries = {block: summarise(coco, ROWS, block) for block in blocks_of(coco, FINAL)}
    one_k = summaries[Block("1k", "1K test (5-fold average)", "test_1k_")]
    assert one_k.loc["full", "rsum_mean"] == pytest.approx(coco.loc[coco.variant == "full", "test_1k_rsum"].mean())
    markdown, tex = to_markdown(summaries, "c"), to_latex(summaries, "c")
    assert "**1K test (5-fold average)**" in markdown and "**5K test**" in markdown
    assert tex.count(r"\multicolumn{9}{l}") == 2 and tex.count(r"\begin{table}") == 1
    best = {Block(b.key, b.title, b.prefix, BEST_VAL): s for b, s in summaries.items()}  # + an Epoch column
    assert to_latex(best, "c").count(r"\multicolumn{10}{l}") == 2 and "& Epoch" in to_latex(best, "c")


def test_latex_is_booktabs_with_escapes_and_bold_best(trials):
    summaries = {TEST: summarise(trials, ROWS, TEST)}
    tex = to_latex(summaries, "R@K in % of test_rsum", label="tab:x")
    for token in (r"\begin{table}", r"\toprule", r"\midrule", r"\bottomrule", r"\caption{", r"\end{table}"):
        assert token in tex
    assert r"w/o L\_dim" in tex and r"in \% of test\_rsum" in tex and "L_dim" not in tex
    full_line = next(line for line in tex.splitlines() if line.startswith("full &"))
    assert full_line.count(r"\textbf{") == 7  # full (tied with 'same') is best in every metric column
    row = next(line for line in tex.splitlines() if line.startswith(r"w/o L\_dim"))
    assert r"$^\dagger$" in row and r"{\scriptsize [$-$" in row and r"[95\% CI]" in tex
    assert latex_escape("a_b%c&d") == r"a\_b\%c\&d"


def test_rows_follow_the_registry_and_bad_lists_are_one_line_errors():
    assert [r.name for r in select_rows("dias", ["base", "full"])] == ["full", "base"]
    rows = [r.name for r in select_rows("dias", None)]
    assert rows[0] == "full" and rows[-1] == "base" and len(rows) == 7
    for variants, message in ((["full", "w/o nothing"], "unknown row 'w/o nothing'"), ([], "is empty"),
                              (["full", "base", "full"], "'full' more than once")):
        with pytest.raises(ConfigError, match=message) as err:
            select_rows("dias", variants)
        assert "\n" not in str(err.value)
    assert "'w/o L_dim'" in str(pytest.raises(ConfigError, select_rows, "dias", ["x"]).value)


def test_checkpoint_rule_option(smoke_study):
    assert smoke_study().ablation.select == "best_val"
    assert smoke_study("ablation.select=final").ablation.select == "final"
    with pytest.raises(ConfigError, match="ablation.select") as err:
        smoke_study("ablation.select=last")
    assert "\n" not in str(err.value)


def test_seeds_option():
    assert seeds_override("0,1,2") == ["ablation.seeds=[0, 1, 2]"]
    with pytest.raises(ConfigError, match="comma-separated integers"):
        seeds_override("0,a")


@pytest.mark.parametrize("override, message", [
    ("ablation.variants=[full, nope]", "unknown row 'nope'"),
    ("ablation.variants=[]", "is empty"),
    ("ablation.variants=[full, full]", "more than once"),
    ("ablation.seeds=[1, 1]", "repeats 1"),
])
def test_malformed_plans_fail_before_ray_starts(smoke_study, monkeypatch, override, message):
    import study.ablation.run as ablation_run

    monkeypatch.setattr(ablation_run, "connect", lambda *a, **k: pytest.fail("Ray must not start"))
    study = smoke_study("method=dias", override)
    with pytest.raises(ConfigError, match=message) as err:
        ablation_run.run_ablation(study)
    assert "\n" not in str(err.value) and not Path(study.storage.path).exists()


def test_bad_data_fails_before_ray_starts(smoke_study, monkeypatch, tmp_path):
    import study.ablation.run as ablation_run

    monkeypatch.setattr(ablation_run, "connect", lambda *a, **k: pytest.fail("Ray must not start"))
    study = smoke_study("method=dias", f"data.root={tmp_path / 'empty'}")
    with pytest.raises(DataError):
        ablation_run.run_ablation(study)
    assert not Path(study.storage.path).exists()


def earlier_study(study_dir: Path, study) -> None:
    """A finished DIAS search study on disk, as ``study run`` leaves it (trial 'b' is the best)."""
    study_dir.mkdir(parents=True)
    (study_dir / "study.yaml").write_text(yaml.safe_dump(study.model_dump(mode="json")))
    (study_dir / "space.yaml").write_text(yaml.safe_dump({"method": "dias", "params": {
        "train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
        "dias.lambda_dim": {"type": "loguniform", "low": 0.1, "high": 30.0}}}))
    (study_dir / "mlflow_parent.json").write_text(json.dumps({"run_id": "unused"}))
    pd.DataFrame([
        {"trial_id": "a", "status": "completed", "train.lr": 1e-4, "dias.lambda_dim": 1.0, "rsum": 50.0},
        {"trial_id": "b", "status": "completed", "train.lr": 3e-4, "dias.lambda_dim": 2.5, "rsum": 80.0},
        {"trial_id": "c", "status": "early-stopped", "train.lr": 1e-3, "dias.lambda_dim": 9.0, "rsum": 90.0},
    ]).to_csv(study_dir / "results.csv", index=False)


def test_from_study_fixes_the_best_trials_values_on_every_row(smoke_study):
    study = smoke_study("method=dias", "ablation.variants=[full, w/o L_dim, base]")
    earlier_study(Path(study.storage.path) / "search", study)
    plan = plan_ablation(study, from_study="search")  # a name under storage.path
    assert plan.source["trial_id"] == "b"  # completed trials win over a better early-stopped one
    assert plan.jobs["full"]["method_params"]["lambda_dim"] == 2.5
    assert plan.jobs["w/o L_dim"]["method_params"]["use_dim"] is False
    assert plan.jobs["base"]["method"] == "base" and plan.jobs["base"]["method_params"] == {}
    assert {job["train"]["lr"] for job in plan.jobs.values()} == {3e-4}
    with pytest.raises(ConfigError, match="no finished study"):
        plan_ablation(study, from_study="nothing-here")


# --------------------------------------------------------------------------------------------------
# End to end: Ray local on 2 CPUs, MLflow on sqlite in a temp dir
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_ablation_writes_three_formats_and_one_parent_four_children(smoke_study, ray_session):
    from mlflow.tracking import MlflowClient

    from study.ablation.run import run_ablation
    from study.report.build import build_report

    study = smoke_study("method=dias", "data.max_images=150", "train.epochs=1",
                        "ablation.variants=[base, full]", "ablation.seeds=[0, 1]")
    outcome = run_ablation(study)
    assert not outcome.interrupted
    trials = pd.read_csv(outcome.ablation_dir / "results.csv")
    assert len(trials) == 4 and set(trials.status) == {"completed"}
    assert dict(zip(trials.variant, trials.method)) == {"full": "dias", "base": "base"}
    table = pd.read_csv(outcome.ablation_dir / "ablation.csv")
    assert list(table.variant) == ["full", "base"] and set(table.block) == {"test"}
    for _, row in table.iterrows():  # mean/std over the seeds of the test metrics at the best-val epoch
        mine = trials[trials.variant == row.variant]
        for metric in METRICS:
            assert row[f"{metric}_mean"] == pytest.approx(mine[f"best_test_{metric}"].mean(), abs=1e-4)
            assert row[f"{metric}_std"] == pytest.approx(mine[f"best_test_{metric}"].std(ddof=1), abs=1e-4)
        assert row.epoch_mean == 1 and row.n_pairs == 2
    # one epoch: the best-validation epoch is the final one
    assert list(trials.best_test_rsum) == pytest.approx(list(trials.test_rsum))
    assert table.set_index("variant").loc["base", "delta_rsum"] == pytest.approx(
        trials[trials.variant == "base"].best_test_rsum.mean() - trials[trials.variant == "full"].best_test_rsum.mean(),
        abs=1e-4)
    assert json.loads((outcome.ablation_dir / "ablation.json").read_text())["select"] == "best_val"
    markdown = (outcome.ablation_dir / "ablation.md").read_text()
    rows = [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("|")][2:]
    assert rows == ["full", "base"] and r"\bottomrule" in (outcome.ablation_dir / "ablation.tex").read_text()

    client = MlflowClient(study.tracking.uri)
    experiment = client.get_experiment_by_name(study.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "ablation"]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(kids) == 4 and len(runs) == 5
    assert {k.data.tags["mlflow.parentRunId"] for k in kids} == {parents[0].info.run_id}
    assert sorted((k.data.tags["variant"], k.data.tags["seed"], k.data.tags["method"]) for k in kids) == [
        ("base", "0", "base"), ("base", "1", "base"), ("full", "0", "dias"), ("full", "1", "dias")]
    assert {k.info.run_name for k in kids} == {"full seed=0", "full seed=1", "base seed=0", "base seed=1"}
    assert all(k.data.tags["status"] == "completed" and k.data.tags["study"] == "smoke" for k in kids)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"ablation.md", "ablation.tex", "ablation.csv", "results.csv"} <= artifacts

    with pytest.raises(ConfigError, match="already finished.*study report"):
        run_ablation(study)
    (outcome.ablation_dir / "ablation.md").unlink()
    rebuilt = build_report(outcome.ablation_dir)  # rebuilt from stored results only
    assert (outcome.ablation_dir / "ablation.md").read_text() == markdown
    assert rebuilt.markdown.startswith(markdown) and "## Term budget" in rebuilt.markdown
    assert "| full    |" in rebuilt.markdown.split("## Term budget")[1]  # the full row's shares, by row


@pytest.mark.slow
def test_a_deliberately_harmful_row_comes_out_marked_with_a_negative_delta(smoke_study, ray_session, monkeypatch):
    # Calibration end to end: a test-only row that is `full` with the learning rate divided by 100
    # must be flagged (Holm-adjusted paired t, p < 0.05) with a negative Δ rSum and a CI below 0.
    import dataclasses

    from study.ablation import run as ablation_run
    from trainables.methods import Ablation

    def with_harmful_row(*args, **kwargs):
        plan = plan_ablation(*args, **kwargs)
        harmful = json.loads(json.dumps(plan.jobs["full"]))
        harmful["train"]["lr"] /= 100
        return dataclasses.replace(plan, rows=(*plan.rows, Ablation("lr/100", plan.study.method)),
                                   jobs={**plan.jobs, "lr/100": harmful})

    monkeypatch.setattr(ablation_run, "plan_ablation", with_harmful_row)
    study = smoke_study("method=dias", "data.max_images=150", "train.epochs=2", "ablation.variants=[full]",
                        "ablation.seeds=[0, 1, 2, 3]")
    outcome = ablation_run.run_ablation(study)
    table = pd.read_csv(outcome.ablation_dir / "ablation.csv").set_index("variant")
    harmful = table.loc["lr/100"]
    assert harmful.n_pairs == 4 and harmful.delta_rsum < 0 and harmful.delta_ci_high < 0
    assert harmful.p_holm < 0.05 and bool(harmful.significant)
    assert "lr/100" in outcome.markdown and "†" in outcome.markdown.split("lr/100")[1].split("\n")[0]
