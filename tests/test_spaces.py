"""Search spaces: shipped files validate, conditions hold, bad spaces are one-line errors."""

from pathlib import Path

import optuna
import pytest

from study.config import load_study
from study.spaces import DefineByRun, grid, resolve_space
from trainables.errors import ConfigError
from trainables.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def study_for(tmp_path, method="base", search=""):
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nmethod: {method}\n{search}")
    return load_study(path)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_ships_a_valid_default_space(tmp_path, method):
    params = resolve_space(study_for(tmp_path, method))
    assert "train.lr" in params
    assert all(name.split(".")[0] in ("train", "model", method) for name in params)


def test_conditional_parameter_only_when_its_parent_allows(tmp_path):
    params = resolve_space(study_for(tmp_path, "base"))
    assert params["train.margin"].when == {"train.loss": "triplet"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = DefineByRun(params)
    for _ in range(30):
        trial = study.ask()
        space(trial)
        assert ("train.margin" in trial.params) == (trial.params["train.loss"] == "triplet")
        study.tell(trial, 0.0)
    losses = {t.params["train.loss"] for t in study.trials}
    assert losses == {"triplet", "infonce"}  # both branches were exercised


def test_inline_params_override_the_file(tmp_path):
    params = resolve_space(study_for(tmp_path, "base", "search: {params: {train.lr: {type: uniform, low: 0.1, high: 0.2}}}\n"))
    assert (params["train.lr"].type, params["train.lr"].low) == ("uniform", 0.1)


@pytest.mark.parametrize("params, message", [
    ("{train.lrr: {type: uniform, low: 0, high: 1}}", "unknown parameter 'train.lrr'"),
    ("{train.lr: {type: uniform, low: 1, high: 1}}", "empty range"),
    ("{train.lr: {type: loguniform, low: 0, high: 1}}", "low > 0"),
    ("{train.loss: {type: categorical, choices: []}}", "non-empty"),
    ("{train.loss: {type: categorical, choices: [triplet, hinge]}}", "train.loss='hinge'"),
    ("{train.margin: {type: uniform, low: 0.1, high: 0.3, when: {train.nope: 1}}}", "depends on"),
])
def test_bad_spaces_are_one_line_errors(tmp_path, params, message):
    study = study_for(tmp_path, "base", f"search: {{space: {tmp_path / 'none.yaml'}, params: {params}}}\n")
    with pytest.raises(ConfigError) as err:
        resolve_space(study.model_copy(update={"search": study.search.model_copy(update={"space": None})}))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_space_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="search space file not found"):
        resolve_space(study_for(tmp_path, "base", f"search: {{space: {tmp_path / 'nope.yaml'}}}\n"))


def test_grid_needs_values_for_continuous_parameters(tmp_path):
    params = resolve_space(study_for(tmp_path, "base"))
    with pytest.raises(ConfigError, match="values"):
        grid(params)
    fixed = resolve_space(study_for(tmp_path, "base", "search: {space: none, params: {train.lr: {type: uniform, low: 0.001, high: 0.01, values: [0.001, 0.01]}}}\n"))
    assert grid({"train.lr": fixed["train.lr"]}) == {"train.lr": [0.001, 0.01]}


def test_a_huge_int_range_is_checked_by_its_ends_not_integer_by_integer(tmp_path):
    import time

    study = study_for(tmp_path, "base", "search: {space: none, params: {train.eval_batch_size: "
                                        "{type: int, low: 1, high: 100000000, log: true}}}\n")
    start = time.perf_counter()
    params = resolve_space(study)
    assert time.perf_counter() - start < 1.0 and params["train.eval_batch_size"].checked_values() == [1, 100000000]


@pytest.mark.parametrize("param, message", [
    ("{type: int, low: 0, high: 8, log: true}", "low >= 1"),
    ("{type: int, low: 1.5, high: 8}", "whole-number bounds"),
    ("{type: uniform, low: 0.1, high: 0.2, log: true}", "use type: loguniform"),
])
def test_numeric_ranges_are_checked_symbolically(tmp_path, param, message):
    study = study_for(tmp_path, "base", f"search: {{space: none, params: {{train.eval_batch_size: {param}}}}}\n")
    with pytest.raises(ConfigError, match=message):
        resolve_space(study)


def test_a_space_file_for_another_method_is_refused(tmp_path):
    (tmp_path / "dias.yaml").write_text("method: dias\nparams: {train.lr: {type: uniform, low: 0.1, high: 0.2}}\n")
    with pytest.raises(ConfigError, match="is for method 'dias'"):
        resolve_space(study_for(tmp_path, "base", f"search: {{space: {tmp_path / 'dias.yaml'}}}\n"))
