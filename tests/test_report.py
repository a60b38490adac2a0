"""``study report``: tables, Optuna figures and the self-contained HTML page, rebuilt from stored
results. Constructed study directories (no Ray) cover grid, interrupted and tiny studies; one real
3-trial TPE study covers the Optuna plots end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
