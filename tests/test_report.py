"""``study report``: tables, Optuna figures and the self-contained HTML page, rebuilt from stored
results. Constructed study directories (no Ray) cover grid, interrupted and tiny studies; one real
3-trial TPE study covers the Optuna plots end to end."""

from __future__ import annotations

import json
import re
from html import escape
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from study import tracking
from study.cli import main
from study.report.build import build_report
from trainables.errors import ConfigError

LR = {"type": "loguniform", "low": 1e-5, "high": 1e-2}
LOSS = {"type": "categorical", "choices": ["triplet", "infonce"]}
TRIALS = [{"trial_id": "t0", "status": "completed", "train.lr": 1e-3, "train.loss": "infonce", "rsum": 40.0},
          {"trial_id": "t1", "status": "completed", "train.lr": 1e-4, "train.loss": "triplet", "rsum": 20.0},
          {"trial_id": "t2", "status": "completed", "train.lr": 3e-4, "train.loss": "infonce", "rsum": 30.0}]


def study_dir_on_disk(study, params: dict, algorithm: str) -> Path:
    """What ``study run`` leaves before any results: study.yaml, space.yaml, the MLflow parent run."""
    study = study.model_copy(update={"search": study.search.model_copy(update={"algorithm": algorithm})})
    study_dir = Path(study.storage.path) / study.name
    study_dir.mkdir(parents=True)
    (study_dir / "study.yaml").write_text(yaml.safe_dump(study.model_dump(mode="json")))
    (study_dir / "space.yaml").write_text(yaml.safe_dump({"method": study.method, "params": params}))
    client, experiment_id = tracking.client_for(study.tracking.uri, study.tracking.experiment)
    parent = client.create_run(experiment_id, run_name=study.name, tags={"kind": "study"}).info.run_id
    (study_dir / "mlflow_parent.json").write_text(json.dumps({"run_id": parent}))
    return study_dir


def journal_with(study_dir: Path, name: str, trials: list[dict], params: dict) -> None:
    distributions = {"train.lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
                     "train.loss": optuna.distributions.CategoricalDistribution(["triplet", "infonce"])}
    storage = JournalStorage(JournalFileBackend(str(study_dir / "optuna.journal")))
    journal = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for trial in trials:
        journal.add_trial(optuna.trial.create_trial(
            params={k: trial[k] for k in params}, distributions={k: distributions[k] for k in params},
            value=trial["rsum"]))


def artifacts(study, study_dir: Path, folder: str) -> set[str]:
    parent = json.loads((study_dir / "mlflow_parent.json").read_text())["run_id"]
    return {a.path for a in MlflowClient(study.tracking.uri).list_artifacts(parent, folder)}


def test_grid_study_gets_table_and_per_parameter_plot_from_results_csv(smoke_study):
    study = smoke_study()
    study_dir = study_dir_on_disk(study, {"train.lr": {**LR, "values": [1e-3, 1e-4, 3e-4]}, "train.loss": LOSS}, "grid")
    pd.DataFrame(TRIALS).to_csv(study_dir / "results.csv", index=False)
    report = build_report(study_dir)
    assert (study_dir / "report" / "params.png").stat().st_size > 1000
    assert not (study_dir / "report" / "importances.png").exists()
    assert any("need a TPE or random study" in note for note in report.notes)
    ranked = [line.split("|")[2].strip() for line in report.markdown.splitlines() if line.startswith("| ")][1:]
    assert ranked == ["t0", "t2", "t1"]  # by rsum, best first
    page = (study_dir / "report" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and 'src="params.png"' not in page
    assert {"report/index.html", "report/params.png", "report/report.md"} <= artifacts(study, study_dir, "report")


def test_interrupted_study_without_results_csv_and_one_finished_trial(smoke_study):
    study = smoke_study("train.epochs=2")
    study_dir = study_dir_on_disk(study, {"train.lr": LR, "train.loss": LOSS}, "optuna-tpe")
    for i, epochs in enumerate((2, 1)):  # trial 0 finished, trial 1 was cut off after one epoch
        trial = study_dir / f"trial_{i}"
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps({"train.lr": 1e-3, "train.loss": "infonce"}))
        lines = [json.dumps({"training_iteration": e + 1, "rsum": 10.0 * (e + 1) + i}) for e in range(epochs)]
        (trial / "result.json").write_text("\n".join(lines) + "\n")
    journal_with(study_dir, study.name, TRIALS[:1], ["train.lr", "train.loss"])
    report = build_report(study_dir)
    assert any("read from their Tune directories" in note for note in report.notes)
    assert any("at least 2 completed trials; this study has 1" in note for note in report.notes)
    assert "| 1    | 0        | completed  |" in report.markdown and "incomplete" in report.markdown
    assert (study_dir / "report" / "history.png").is_file() and (study_dir / "report" / "index.html").is_file()


def test_single_parameter_importance_is_a_note_not_an_error(smoke_study):
    study = smoke_study()
    study_dir = study_dir_on_disk(study, {"train.lr": LR}, "random")
    pd.DataFrame(TRIALS).drop(columns="train.loss").to_csv(study_dir / "results.csv", index=False)
    journal_with(study_dir, study.name, TRIALS, ["train.lr"])
    report = build_report(study_dir)
    assert any("Only one searched parameter (train.lr)" in note for note in report.notes)
    assert (study_dir / "report" / "slice.png").is_file()


def test_report_of_something_that_is_not_a_study_is_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="is not a study directory"):
        build_report(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.slow
def test_report_of_a_finished_tpe_study(smoke_study, ray_session, capsys):
    from study.search import run_study

    study = smoke_study("data.max_images=150", "train.epochs=1", "search.num_samples=3", "search.scheduler=fifo")
    outcome = run_study(study)
    capsys.readouterr()  # only the report's own output below
    assert main(["report", str(outcome.study_dir), "--top", "2"]) == 0
    out = outcome.study_dir / "report"
    for name in ("history.png", "parallel.png", "slice.png", "importances.png"):
        assert (out / name).stat().st_size > 1000, name
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "Parameter importances" in page
    best = pd.read_csv(outcome.results_csv).sort_values("rsum", ascending=False).head(2)
    printed = capsys.readouterr().out
    ranked = [line.split("|")[2].strip() for line in printed.splitlines() if line.startswith("| ")]
    assert ranked[1:3] == list(best.trial_id)
    assert {"report/importances.png", "report/index.html"} <= artifacts(study, outcome.study_dir, "report")


def test_study_report_shows_the_term_budget_of_the_top_trials(smoke_study):
    study = smoke_study()
    study_dir = study_dir_on_disk(study, {"train.lr": {**LR, "values": [1e-3, 1e-4, 3e-4]}, "train.loss": LOSS}, "grid")
    budget = [{"budget/align": 0.7, "budget/dim": 0.3}, {"budget/align": 0.9, "budget/dim": 0.1},
              {"budget/align": 0.5, "budget/dim": 0.5}]
    pd.DataFrame([{**t, **b} for t, b in zip(TRIALS, budget)]).to_csv(study_dir / "results.csv", index=False)
    report = build_report(study_dir, top=2)
    section = report.markdown.split("## Term budget", 1)[1]
    rows = [line.split("|")[1:4] for line in section.splitlines() if re.match(r"\| t\d ", line)]
    assert [[c.strip() for c in row] for row in rows] == [["t0", "70.0 %", "30.0 %"], ["t2", "50.0 %", "50.0 %"]]
    assert "Term budget" in (study_dir / "report" / "index.html").read_text()


# --------------------------------------------------------------------------------------------------
# Ablation directories: forest plot and HTML page from constructed per-seed results (no Ray)
# --------------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ABLATION_ROWS = ["full", "w/o decoupling", "w/o L_dim", "base"]
SEED_RSUM = {"full": [300.0, 304.0, 302.0], "w/o decoupling": [280.0, 285.0, 281.0],  # clearly worse
             "w/o L_dim": [301.0, 300.0, 305.0], "base": [200.0, 230.0, 215.0]}  # no effect; much worse


def ablation_dir_on_disk(study, rsum: dict[str, list[float]], prefixes=("test_",)) -> Path:
    """What ``study ablate`` leaves: study.yaml, ablation.json, the MLflow parent, results.csv with
    one row per (row, seed); R@K cells are rSum / 6 plus a per-metric offset so columns differ."""
    from study.results import RETRIEVAL

    ablation_dir = Path(study.storage.path) / f"{study.name}-ablation"
    ablation_dir.mkdir(parents=True)
    (ablation_dir / "study.yaml").write_text(yaml.safe_dump(study.model_dump(mode="json")))
    seeds = list(range(len(next(iter(rsum.values())))))
    meta = {"name": f"{study.name}-ablation", "study": study.name, "method": "dias", "dataset": "synth",
            "rows": list(rsum), "seeds": seeds, "epochs": 2,
            "source": {"from_study": "/x/results/dias-search", "trial_id": "7"}}
    (ablation_dir / "ablation.json").write_text(json.dumps(meta))
    client, experiment_id = tracking.client_for(study.tracking.uri, study.tracking.experiment)
    parent = client.create_run(experiment_id, run_name=meta["name"], tags={"kind": "ablation"}).info.run_id
    (ablation_dir / "mlflow_parent.json").write_text(json.dumps({"run_id": parent}))
    rows = []
    for variant, values in rsum.items():
        for seed, total in zip(seeds, values):
            row = {"trial_id": f"{variant}-{seed}", "variant": variant, "seed": seed, "status": "completed",
                   "epochs": meta["epochs"]}
            for k, prefix in enumerate(prefixes):  # COCO: a 5K block a little below the 1K one
                cells = {f"{prefix}{m}": (total - 20 * k) / 6 + i for i, m in enumerate(RETRIEVAL[:-1])}
                row.update(cells, **{f"{prefix}rsum": sum(cells.values())})
            rows.append(row)
    pd.DataFrame(rows).to_csv(ablation_dir / "results.csv", index=False)
    return ablation_dir


def drawn(ax) -> tuple[dict[str, dict], list[str]]:
    """Per y tick label what the Axes shows: the point's x, whether it is filled, the whisker's ends."""
    import matplotlib.colors as mcolors

    ticks = ax.get_yticks()  # shared y: the right panel's labels are hidden, its formatter still names them
    labels = dict(zip(np.round(ticks).astype(int), ax.yaxis.get_major_formatter().format_ticks(ticks)))
    out = {}
    points = [c for c in ax.collections if not hasattr(c, "get_segments")]  # scatter: one per marker style
    for collection in points:
        offsets = collection.get_offsets()
        for (x, y), face in zip(offsets, np.broadcast_to(collection.get_facecolors(), (len(offsets), 4))):
            out[labels[round(y)]] = {"x": float(x), "filled": mcolors.to_hex(face) != "#ffffff"}
    for collection in ax.collections:
        if hasattr(collection, "get_segments"):  # hlines: the whiskers
            for (x0, y0), (x1, _) in collection.get_segments():
                out[labels[round(y0)]]["ci"] = (float(x0), float(x1))
    return out, [labels[k] for k in sorted(labels, reverse=True)]


def test_ablation_report_writes_forest_png_and_page(smoke_study):
    import matplotlib.pyplot as plt
    from matplotlib.image import imread

    from study.report.plots import forest_figure

    study = smoke_study()
    ablation_dir = ablation_dir_on_disk(study, SEED_RSUM, prefixes=("test_1k_", "test_"))  # COCO: 1K and 5K
    report = build_report(ablation_dir)
    png, page = ablation_dir / "report" / "forest.png", ablation_dir / "report" / "index.html"
    assert {png, page} <= set(report.files) and report.out_dir == ablation_dir / "report"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 0
    height, width = imread(png).shape[:2]
    assert width > height > 200  # two panels side by side

    table = pd.read_csv(ablation_dir / "ablation.csv")
    fig, points, _ = forest_figure(table, "full", "t")
    try:
        assert [ax.get_title() for ax in fig.axes] == ["1K test (5-fold average)", "5K test"]
        for ax, block in zip(fig.axes, ("1k", "5k")):
            shown, order = drawn(ax)
            assert order == ABLATION_ROWS[1:]  # table order, top to bottom, no reference row
            rows = table[(table.block == block) & (table.variant != "full")].set_index("variant")
            for name, row in rows.iterrows():
                assert shown[name]["x"] == pytest.approx(row.delta_rsum)
                assert shown[name]["filled"] == bool(row.significant)
                if np.isfinite(row.get("delta_ci_low", np.nan)):  # a whisker exactly where the CSV's CI is
                    assert shown[name]["ci"] == pytest.approx((row.delta_ci_low, row.delta_ci_high))
                else:
                    assert "ci" not in shown[name]
            assert "Δ rSum vs full" in ax.get_xlabel()
    finally:
        plt.close(fig)
    trials = pd.read_csv(ablation_dir / "results.csv")
    mean = trials.groupby("variant").test_rsum.mean()
    base = points[(points.block == "5k") & (points.variant == "base")].delta.item()
    assert base == pytest.approx(mean["base"] - mean["full"], abs=1e-3)  # Δ from the seeds, not from the CSV

    html = page.read_text()
    assert all(f"<td>{name}</td>" in html for name in ABLATION_ROWS)
    assert html.count("data:image/png;base64,") == 1 and "forest plot" in html
    caption = (ablation_dir / "ablation.md").read_text().strip().split("\n\n")[-1]
    assert caption.startswith("Ablation of dias") and escape(caption) in html
    assert "best trial 7 of dias-search" in html and "1K test (5-fold average)" in html
    assert "−" + f"{mean['full'] - mean['base']:.1f}" in html  # the formatted Δ of base
    parent = json.loads((ablation_dir / "mlflow_parent.json").read_text())["run_id"]
    logged = {a.path for a in MlflowClient(study.tracking.uri).list_artifacts(parent, "report")}
    assert {"report/forest.png", "report/index.html"} <= logged


def test_forest_plot_draws_each_ci_as_given_and_a_point_alone_without_one(tmp_path):
    import matplotlib.pyplot as plt

    from study.report.plots import forest_figure, forest_plot

    frame = pd.DataFrame({"block": "test", "variant": ABLATION_ROWS, "delta_rsum": [0.0, -20.0, 1.5, -87.0],
                          "delta_ci_low": [float("nan"), -26.0, -4.0, float("nan")],
                          "delta_ci_high": [float("nan"), -14.0, 7.0, float("nan")],
                          "p_holm": [float("nan"), 0.01, 0.6, float("nan")],
                          "significant": [False, True, False, False]})
    fig, _, notes = forest_figure(frame, "full", "t")
    shown, _ = drawn(fig.axes[0])
    assert shown["w/o decoupling"]["ci"] == (-26.0, -14.0) and shown["w/o L_dim"]["ci"] == (-4.0, 7.0)
    assert shown["base"]["x"] == -87.0 and "ci" not in shown["base"]
    assert [shown[n]["filled"] for n in ABLATION_ROWS[1:]] == [True, False, False]
    assert fig.axes[0].get_xlabel() == "Δ rSum vs full (95 % CI, paired t over seeds)"
    assert any("No 95 % CI" in note and "base (test)" in note for note in notes)
    assert any(t.get_text() == "Holm-adjusted p < 0.05" for t in fig.legends[0].get_texts())
    plt.close(fig)
    forest = forest_plot(frame.iloc[:1], "full", tmp_path / "f.png", "t")  # the reference row alone
    assert forest.path is None and not (tmp_path / "f.png").exists() and "Only the reference row" in forest.notes[0]


def test_ablation_report_without_ci_columns_draws_points_and_says_so(smoke_study, monkeypatch):
    """A table from before the paired test (no CI, no Holm columns): points without whiskers, a note."""
    import study.report.build as build

    real = build.write_tables

    def older_tables(trials, meta, out_dir):
        markdown, files = real(trials, meta, out_dir)
        table = pd.read_csv(files[2])
        table.drop(columns=[c for c in ("delta_ci_low", "delta_ci_high", "p_holm") if c in table]).to_csv(
            files[2], index=False)
        return markdown, files

    monkeypatch.setattr(build, "write_tables", older_tables)
    ablation_dir = ablation_dir_on_disk(smoke_study(), SEED_RSUM)
    report = build_report(ablation_dir)
    png = ablation_dir / "report" / "forest.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 0
    assert any("no 95 % CI of Δ rSum" in note for note in report.notes)
    html = (ablation_dir / "report" / "index.html").read_text()
    assert "no 95 % CI of Δ rSum" in html and "data:image/png;base64," in html
    assert "[" not in html.split("<h2>Test split</h2>")[1].split("</table>")[0]  # Δ cells without a CI
    assert "p (Holm-adjusted)" not in html
