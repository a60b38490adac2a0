"""Ablation tables: the table/significance maths on constructed trials (no Ray), the plan's
validation before Ray starts, and one tiny real ablation (2 rows x 2 seeds) end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from study.ablation.plan import plan_ablation, seeds_override, select_rows
from study.ablation.render import display_frame, latex_escape, to_latex, to_markdown
from study.ablation.stats import METRICS, Block, blocks_of, caption, summarise, welch_p
from trainables.errors import ConfigError, DataError

TEST = Block("test", "test split", "test_")
ROWS = ["full", "w/o L_dim", "same", "base"]


def constructed_trials(rsum: dict[str, list[float]], prefix: str = "test_") -> pd.DataFrame:
    """One trial per (row, seed); R@K cells are rSum / 6 plus a per-metric offset so columns differ."""
    rows = []
    for variant, values in rsum.items():
        for seed, total in enumerate(values):
            metrics = {f"{prefix}{m}": total / 6 + i for i, m in enumerate(METRICS[:-1])}
            metrics[f"{prefix}rsum"] = sum(metrics.values())
            rows.append({"trial_id": f"{variant}-{seed}", "variant": variant, "seed": seed,
                         "status": "completed", **metrics})
    return pd.DataFrame(rows)


@pytest.fixture
def trials() -> pd.DataFrame:
    return constructed_trials({"full": [300.0, 306.0, 303.0], "w/o L_dim": [240.0, 246.0, 243.0],
                               "same": [300.0, 306.0, 303.0], "base": [150.0, 230.0, 310.0]})


def test_means_stds_and_delta_match_numpy(trials):
    summary = summarise(trials, ROWS, TEST)
    assert list(summary.index) == ROWS
    for name in ROWS:
        rsum = trials.loc[trials.variant == name, "test_rsum"].to_numpy()
        assert summary.loc[name, "rsum_mean"] == pytest.approx(rsum.mean())
        assert summary.loc[name, "rsum_std"] == pytest.approx(rsum.std(ddof=1))
        assert summary.loc[name, "n"] == 3
    full = trials.loc[trials.variant == "full", "test_rsum"].mean()
    assert summary.loc["w/o L_dim", "delta_rsum"] == pytest.approx(
        trials.loc[trials.variant == "w/o L_dim", "test_rsum"].mean() - full)
    assert summary.loc["full", "delta_rsum"] == 0


def test_significance_mark_for_a_clearly_different_row_only(trials):
    summary = summarise(trials, ROWS, TEST)
    assert summary.loc["w/o L_dim", "significant"] and summary.loc["w/o L_dim", "p_value"] < 0.01
    assert not summary.loc["same", "significant"]  # identical seeds: p = 1
    assert not summary.loc["base", "significant"]  # lower mean but noisy: not significant with 3 seeds
    assert np.isnan(summary.loc["full", "p_value"])
    shown = display_frame(summary).set_index("Variant")
    assert shown.loc["w/o L_dim", "rSum"].endswith("†") and "†" not in shown.loc["same", "rSum"]
    assert shown.loc["w/o L_dim", "Δ rSum vs full"] == "−60.0" and shown.loc["full", "Δ rSum vs full"] == "–"


def test_welch_is_undefined_with_one_seed():
    assert np.isnan(welch_p(np.array([1.0]), np.array([1.0, 2.0])))
    assert welch_p(np.array([1.0, 1.1, 0.9]), np.array([5.0, 5.1, 4.9])) < 0.05


def test_failed_trials_do_not_count(trials):
    trials.loc[trials.trial_id == "w/o L_dim-0", ["status", "test_rsum"]] = ["failed", 0.0]
    summary = summarise(trials, ROWS, TEST)
    assert summary.loc["w/o L_dim", "n"] == 2 and summary.loc["w/o L_dim", "rsum_mean"] == pytest.approx(
        trials.loc[trials.trial_id.isin(["w/o L_dim-1", "w/o L_dim-2"]), "test_rsum"].mean())
    text = caption("dias", "synth", [0, 1, 2], [TEST], ROWS, {TEST: summary})
    assert "Fewer seeds finished for: w/o L_dim" in text


def test_blocks_coco_and_validation_fallback(trials):
    assert [b.key for b in blocks_of(trials)] == ["test"]
    coco = pd.concat([trials, constructed_trials({"full": [1.0]}, prefix="test_1k_")])
    assert [b.key for b in blocks_of(coco)] == ["1k", "5k"]
    val = constructed_trials({"full": [1.0, 2.0], "base": [0.5, 0.7]}, prefix="")
    assert [b.prefix for b in blocks_of(val)] == [""]


def test_coco_gets_a_1k_and_a_5k_block_in_every_format(trials):
    one_k_trials = constructed_trials({"full": [400.0, 406.0, 403.0], "w/o L_dim": [340.0, 346.0, 343.0],
                                       "same": [400.0, 406.0, 403.0], "base": [150.0, 230.0, 310.0]}, prefix="test_1k_")
    coco = trials.merge(one_k_trials.drop(columns="status"), on=["trial_id", "variant", "seed"])
    summaries = {block: summarise(coco, ROWS, block) for block in blocks_of(coco)}
    one_k = summaries[Block("1k", "1K test (5-fold average)", "test_1k_")]
    assert one_k.loc["full", "rsum_mean"] == pytest.approx(coco.loc[coco.variant == "full", "test_1k_rsum"].mean())
    markdown, tex = to_markdown(summaries, "c"), to_latex(summaries, "c")
    assert "**1K test (5-fold average)**" in markdown and "**5K test**" in markdown
    assert tex.count(r"\multicolumn{9}{l}") == 2 and tex.count(r"\begin{table}") == 1


def test_markdown_has_rows_in_order_and_the_columns(trials):
    summaries = {TEST: summarise(trials, ROWS, TEST)}
    text = to_markdown(summaries, caption("dias", "synth", [0, 1, 2], [TEST], ROWS, summaries))
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["Variant", "i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "rSum",
                      "Δ rSum vs full"]
    assert [line.split("|")[1].strip() for line in lines[2:]] == ROWS
    assert "Welch's t-test" in text and "seeds 0, 1, 2" in text


def test_latex_is_booktabs_with_escapes_and_bold_best(trials):
    summaries = {TEST: summarise(trials, ROWS, TEST)}
    tex = to_latex(summaries, "R@K in % of test_rsum", label="tab:x")
    for token in (r"\begin{table}", r"\toprule", r"\midrule", r"\bottomrule", r"\caption{", r"\end{table}"):
        assert token in tex
    assert r"w/o L\_dim" in tex and r"in \% of test\_rsum" in tex and "L_dim" not in tex
    full_line = next(line for line in tex.splitlines() if line.startswith("full &"))
    assert full_line.count(r"\textbf{") == 7  # full (tied with 'same') is best in every metric column
    assert r"$^\dagger$" in next(line for line in tex.splitlines() if line.startswith(r"w/o L\_dim"))
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
    for _, row in table.iterrows():  # cells are mean/std over the seeds of each row's final test metrics
        mine = trials[trials.variant == row.variant]
        for metric in METRICS:
            assert row[f"{metric}_mean"] == pytest.approx(mine[f"test_{metric}"].mean(), abs=1e-4)
            assert row[f"{metric}_std"] == pytest.approx(mine[f"test_{metric}"].std(ddof=1), abs=1e-4)
    assert table.set_index("variant").loc["base", "delta_rsum"] == pytest.approx(
        trials[trials.variant == "base"].test_rsum.mean() - trials[trials.variant == "full"].test_rsum.mean(), abs=1e-4)
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
