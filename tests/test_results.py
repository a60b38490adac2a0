"""One status vocabulary and one best-trial rule, shared by run, ablate --from-study, report and MLflow."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from study.config import JOB_SECTIONS, job_with_params, set_dotted
from study.results import STATUSES, TrialRecord, ablation_table, best_trial, is_finished, study_table, trial_status
from trainables.config import JobConfig
from trainables.errors import ConfigError


@pytest.mark.parametrize("failed, done, live, expected", [
    (True, 3, False, "failed"),
    (True, 0, None, "failed"),
    (False, 3, False, "completed"),
    (False, 3, None, "completed"),
    (False, 1, False, "early-stopped"),  # Tune ended it short of the budget: the scheduler stopped it
    (False, 1, True, "incomplete"),  # still pending or running when the driver stopped
    (False, 1, None, "incomplete"),  # read from disk: nothing says who stopped it
])
def test_trial_status(failed, done, live, expected):
    assert trial_status(failed, done, 3, live) == expected
    assert expected in STATUSES


def records() -> list[TrialRecord]:
    return [TrialRecord("a", {"train.lr": 1e-3}, {"rsum": 300.0, "training_iteration": 3}, live=False),
            TrialRecord("b", {"train.lr": 1e-2}, {"rsum": 350.0, "training_iteration": 1}, live=False),
            TrialRecord("c", {"train.lr": 1e-4}, {"rsum": 200.0, "training_iteration": 3}, live=False),
            TrialRecord("d", {"train.lr": 1e-1}, {}, error="ValueError: boom", live=False)]


def test_study_table_and_best_prefers_completed_trials():
    table = study_table(records(), {"train.lr": None}, "rsum", epochs=3)
    assert list(table["status"]) == ["completed", "early-stopped", "completed", "failed"]
    assert table.loc[3, "error"] == "ValueError: boom" and math.isnan(table.loc[3, "rsum"])
    # b has the higher rsum but was judged on one epoch: a completed trial wins.
    assert best_trial(table, "rsum", "max")["trial_id"] == "a"
    assert best_trial(table, "rsum", "min")["trial_id"] == "c"


def test_best_falls_back_to_early_stopped_and_none_without_metric():
    table = study_table(records()[1:2] + records()[3:], {"train.lr": None}, "rsum", epochs=3)
    assert best_trial(table, "rsum", "max")["trial_id"] == "b"
    assert best_trial(table.iloc[1:], "rsum", "max") is None
    assert best_trial(pd.DataFrame({"trial_id": [], "status": []}), "rsum", "max") is None


def test_ablation_table_keeps_split_metrics_and_is_finished_only_without_incomplete_trials():
    done = TrialRecord("x", {"variant": "full", "seed": 0},
                       {"rsum": 1.0, "test_rsum": 2.0, "test_1k_rsum": 3.0, "lr": 0.1, "training_iteration": 2})
    live = TrialRecord("y", {"variant": "base", "seed": 0}, {"training_iteration": 1}, live=True)
    table = ablation_table([done, live], {"full": {"method": "dias"}, "base": {"method": "base"}}, epochs=2)
    assert {"rsum", "test_rsum", "test_1k_rsum"} <= set(table) and "lr" not in table
    assert list(table["method"]) == ["dias", "base"] and list(table["status"]) == ["completed", "incomplete"]
    assert not is_finished(table, 2) and is_finished(table.iloc[:1], 1) and not is_finished(table.iloc[:1], 2)


def test_set_dotted_is_the_one_merge():
    raw = {"train": {"lr": 1.0}, "name": "x"}
    assert set_dotted(raw, {"train.lr": 2.0, "dias.lambda_dim": 3.0}) == {
        "train": {"lr": 2.0}, "name": "x", "dias": {"lambda_dim": 3.0}}
    with pytest.raises(ConfigError, match="'name' in 'name.x' is not a section"):
        set_dotted(raw, {"name.x": 1})


def test_job_with_params_routes_the_method_section_to_method_params():
    job = JobConfig(method="dias", method_params={"lambda_dim": 1.0}).model_dump(mode="json")
    out = job_with_params(job, {"train.lr": 0.01, "dias.lambda_dim": 5.0, "model.embed_dim": 32})
    assert out.train.lr == 0.01 and out.model.embed_dim == 32 and out.method_params == {"lambda_dim": 5.0}
    assert job["method_params"] == {"lambda_dim": 1.0} and job["train"]["lr"] != 0.01  # the base job is untouched
    assert set(JOB_SECTIONS) == {"data", "model", "train"}
