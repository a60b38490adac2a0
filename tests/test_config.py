"""The study file: validation, one-line errors, --set overrides, absolute paths."""

from pathlib import Path

import pytest

from study.cli import main
from study.config import load_study
from trainables.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("study_file", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_files_validate(study_file):
    study = load_study(study_file)
    assert study.name and Path(study.data.root).is_absolute()


def test_defaults_and_overrides_are_typed(tmp_path):
    study = load_study(write(tmp_path, "name: x\n"), ["train.epochs=3", "model.pooling=mean"])
    assert study.train.epochs == 3 and study.model.pooling == "mean"
    with pytest.raises(ConfigError, match="train.epochs"):
        load_study(write(tmp_path, "name: x\n"), ["train.epochs=lots"])


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_study(write(tmp_path, "name: x\ntrain: {epocs: 2}\n"))
    message = str(err.value)
    assert "train.epocs" in message and "epochs" in message and "\n" not in message


def test_unknown_method_lists_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'clip'.*base"):
        load_study(write(tmp_path, "name: x\nmethod: clip\n"))


def test_broken_yaml_is_one_line_with_the_line_number(tmp_path):
    with pytest.raises(ConfigError, match=r"study.yaml: line 2 is not valid YAML"):
        load_study(write(tmp_path, "name: x\ntrain: epochs: 2\n"))


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = load_study(write(tmp_path, "name: x\ndata: {root: d}\nstorage: {path: r}\n"))
    assert study.data.root == str(tmp_path / "d") and study.storage.path == str(tmp_path / "r")
    assert study.tracking.uri == f"sqlite:///{tmp_path}/mlruns.db"


def test_cli_reports_config_errors_in_one_line_with_exit_2(tmp_path, capsys):
    code = main(["train", str(write(tmp_path, "name: x\nbogus: 1\n"))])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "bogus" in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_cross_section_checks_run_before_ray(tmp_path):
    with pytest.raises(ConfigError, match="cdds.num_heads"):
        load_study(write(tmp_path, "name: x\nmethod: cdds\nmodel: {embed_dim: 30}\ncdds: {num_heads: 4}\n"))


def test_tpe_startup_trials_reach_the_sampler_and_need_tpe(tmp_path):
    from study.spaces import resolve_space
    from study.tuner import searcher

    study = load_study(write(tmp_path, "name: x\nmethod: dias\n"), ["search.startup_trials=3"])
    search = searcher(study, resolve_space(study), str(tmp_path / "optuna.journal"))
    assert search._sampler._n_startup_trials == 3
    default = load_study(write(tmp_path, "name: x\nmethod: dias\n"))
    assert searcher(default, resolve_space(default), str(tmp_path / "d.journal"))._sampler._n_startup_trials == 10
    with pytest.raises(ConfigError, match="startup_trials applies to algorithm optuna-tpe only, not random"):
        load_study(write(tmp_path, "name: x\n"), ["search.startup_trials=3", "search.algorithm=random"])


@pytest.mark.parametrize("text, message", [
    ("name: x\ntrain: {epochs: yes}\n", "train.epochs: expected a number, got the YAML boolean"),
    ("name: x\n1: 2\n", "key 1 is not a name"),
    ("", "is empty"),
    ("name: x\nsearch: {metric: r_sum}\n", "'r_sum' is not a metric"),
])
def test_mistakes_pydantic_would_let_pass_are_refused(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_study(write(tmp_path, text))
    assert "\n" not in str(err.value) and "(top level)" not in str(err.value)


def test_a_set_problem_is_blamed_on_the_set_not_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set train.batch_size=1: train.batch_size"):
        load_study(write(tmp_path, "name: x\n"), ["train.epochs=2", "train.batch_size=1"])
    with pytest.raises(ConfigError, match=r"^--set method=clip: unknown method"):
        load_study(write(tmp_path, "name: x\n"), ["train.epochs=2", "method=clip"])
