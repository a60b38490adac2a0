"""``ablate --tune-rows N``: every row's own search space, its validation before Ray, the registry's
claim that a switched-off part leaves its knobs without effect, resume, and one run end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from study.ablation import row_search
from study.ablation.plan import (
    describe_source,
    plan_ablation,
    restrict_space,
    row_slug,
    row_study,
    tuned_plan,
)
from study.cli import main
from study.spaces import Param, default_space_path, load_space_file
from tests.conftest import SMOKE
from tests.test_methods import IMAGE_DIM, job_for, random_batch
from trainables.errors import ConfigError
from trainables.methods import METHODS, build_model, get_method


def shipped(method: str) -> set[str]:
    return set(load_space_file(default_space_path(method)).params)


def searched(plan) -> dict[str, set[str]]:
    return {row: set(search.search.params) for row, search in plan.searches.items()}


# --------------------------------------------------------------------------------------------------
# Per-row spaces
# --------------------------------------------------------------------------------------------------


def test_dias_rows_drop_what_they_switch_off_and_base_keeps_only_shared_keys(smoke_study):
    plan = plan_ablation(smoke_study("method=dias"), tune_rows=3)
    space, spaces = shipped("dias"), searched(plan)
    assert spaces["full"] == space
    assert spaces["w/o L_dim"] == space - {"dias.lambda_dim", "dias.dim_loss"}
    assert spaces["w/o L_inter"] == space - {"dias.lambda_inter"}
    assert spaces["w/o sparse"] == space - {"dias.sparsity_k"}
    assert spaces["w/o spatial"] == space - {"dias.lambda_inter", "dias.lambda_intra", "dias.sparsity_k"}
    assert spaces["base"] == {"train.lr"}
    for row in plan.rows:  # each search is a study of the row itself: its method, switches, TPE + ASHA
        search = plan.searches[row.name]
        assert search.method == row.method and search.name == row_slug(row.name)
        assert search.search.algorithm == "optuna-tpe" and search.search.scheduler == "asha"
        assert search.search.num_samples == 3 and search.search.seed == search.train.seed
        assert Path(search.storage.path) == Path(plan.study.storage.path) / "smoke-ablation" / "tune"
        assert all(getattr(search.dias, k) == v for k, v in row.overrides.items())
    assert plan.source == {"tune_rows": 3, "metric": "rsum", "mode": "max", "rows": {}}


def test_cdds_rows_drop_what_they_switch_off(smoke_study):
    spaces = searched(plan_ablation(smoke_study("method=cdds"), tune_rows=2))
    space = shipped("cdds")
    weights = {"cdds.alpha_m", "cdds.alpha_f", "cdds.alpha_x"}
    assert spaces["full"] == space
    assert spaces["w/o decoupling"] == space - weights  # no modality path: L_m, L_f, L_x are gone
    assert spaces["w/o UNet"] == space - weights - {"cdds.unet_depth", "cdds.noise_groups", "cdds.noise_std"}
    assert spaces["w/o L_m"] == space - {"cdds.alpha_m"}
    assert spaces["w/o completeness"] == space - {"cdds.alpha_f", "cdds.alpha_x"}
    assert spaces["w/o noise"] == space - {"cdds.noise_groups", "cdds.noise_std"}
    assert spaces["w/o sampling"] == space - {"cdds.alpha_x", "cdds.threshold_alpha", "cdds.kl_temperature"}
    assert spaces["base"] == {"train.lr"}


def test_a_condition_on_a_dropped_parameter_is_decided_by_the_rows_value(smoke_study):
    study = smoke_study("method=dias", "search.space=none")
    barlow, infonce = {"dias.dim_loss": "barlow"}, {"dias.dim_loss": "dim_infonce"}
    params = {"dias.dim_loss": Param(type="categorical", choices=["barlow", "dim_infonce"]),
              "train.margin": Param(type="uniform", low=0.1, high=0.3, when=barlow),
              "train.lr": Param(type="loguniform", low=1e-4, high=1e-3, when=infonce)}
    rows = {row.name: row for row in get_method("dias").ablations}
    full = restrict_space(params, row_study(study, rows["full"]))
    assert full == params  # nothing dropped, conditions kept
    no_dim = restrict_space(params, row_study(study, rows["w/o L_dim"]))  # dim_loss inert, fixed at barlow
    assert set(no_dim) == {"train.margin"} and no_dim["train.margin"].when == {}
    assert restrict_space(params, row_study(study, rows["base"])) == {}  # base has no dias.dim_loss at all


def test_search_params_join_the_space_and_a_row_left_with_nothing_runs_no_search(smoke_study):
    study = smoke_study("method=dias", "search.space=none",
                        "search.params={dias.lambda_dim: {type: loguniform, low: 0.1, high: 10}}",
                        "ablation.variants=[full, w/o L_dim, base]")
    plan = plan_ablation(study, tune_rows=2)
    assert searched(plan) == {"full": {"dias.lambda_dim"}}
    assert plan.source["rows"] == {name: {"params": [], "trial_id": None, "values": {}, "rsum": None}
                                   for name in ("w/o L_dim", "base")}
    lines = describe_source(plan.source)
    assert len(lines) == 2 and all("nothing to search" in line for line in lines)


def test_each_row_runs_at_its_own_best_values(smoke_study):
    plan = plan_ablation(smoke_study("method=dias", "ablation.variants=[full, w/o L_dim, base]"), tune_rows=2)
    rows = {"full": {"trial_id": "a", "values": {"train.lr": 3e-4, "dias.lambda_dim": 2.5}, "rsum": 90.0},
            "w/o L_dim": {"trial_id": "b", "values": {"dias.lambda_inter": 7.0}, "rsum": 80.0},
            "base": {"trial_id": "c", "values": {"train.lr": 2e-5}, "rsum": 70.0}}
    with pytest.raises(ConfigError, match="no finished search for row 'base'"):
        tuned_plan(plan, {**plan.source, "rows": {k: rows[k] for k in ("full", "w/o L_dim")}})
    tuned = tuned_plan(plan, {**plan.source, "rows": rows})
    assert describe_source(tuned.source)[0] == ("full: best of 2 trials a (rsum 90.0): "
                                                "train.lr=0.0003, dias.lambda_dim=2.5")
    jobs = tuned.jobs
    default = plan.study.dias
    assert jobs["full"]["train"]["lr"] == 3e-4 and jobs["full"]["method_params"]["lambda_dim"] == 2.5
    assert jobs["w/o L_dim"]["method_params"]["lambda_inter"] == 7.0
    assert jobs["w/o L_dim"]["train"]["lr"] == plan.study.train.lr  # not full's
    assert jobs["w/o L_dim"]["method_params"]["use_dim"] is False
    assert jobs["full"]["method_params"]["lambda_inter"] == default.lambda_inter
    assert jobs["base"]["method"] == "base" and jobs["base"]["train"]["lr"] == 2e-5


# --------------------------------------------------------------------------------------------------
# Checked before Ray starts: one line, nothing written
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, overrides, message", [
    ({"tune_rows": 0}, [], r"--tune-rows 0: .*at least 1"),
    ({"tune_rows": 2, "from_study": "earlier"}, [], "--from-study and --tune-rows"),
    ({"tune_rows": 2}, ["search.params={dias.lambda_dim: {type: uniform, low: -1, high: 1}}"],
     r"dias.lambda_dim=-1.* not a valid value"),
    ({"tune_rows": 2}, ["search.params={dias.use_dim: [true, false]}"], "unknown parameter 'dias.use_dim'"),
])
def test_bad_tune_rows_fail_before_ray_starts(smoke_study, monkeypatch, kwargs, overrides, message):
    import study.ablation.run as ablation_run

    monkeypatch.setattr(ablation_run, "connect", lambda *a, **k: pytest.fail("Ray must not start"))
    study = smoke_study("method=dias", *overrides)
    with pytest.raises(ConfigError, match=message) as err:
        ablation_run.run_ablation(study, **kwargs)
    assert "\n" not in str(err.value) and not Path(study.storage.path).exists()


@pytest.mark.parametrize("flags, message", [
    (["--from-study", "earlier", "--tune-rows", "2"], "--from-study and --tune-rows"),
    (["--resume", "--tune-rows", "2"], "drop --tune-rows"),
])
def test_cli_refuses_two_sources_in_one_line(flags, message, capsys):
    assert main(["ablate", str(SMOKE), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


# --------------------------------------------------------------------------------------------------
# The registry's inert keys really are inert (and the same change matters where the switch is on)
# --------------------------------------------------------------------------------------------------

# An alternative value per searchable key, with what it needs to matter at all (dim_temperature is
# read by dim_infonce only), set on top of the row's switches.
ALTERNATIVES = {
    "dias": {"lambda_dim": 7.0, "dim_loss": "dim_infonce", "lambda_offdiag": 0.2, "attn_temperature": 0.5,
             "dim_temperature": (0.5, {"dim_loss": "dim_infonce"}), "lambda_inter": 3.0, "lambda_intra": 3.0,
             "sparse_on": "violation", "sparsity_k": 2.0, "sparsity_mode": "hard",
             "sparsity_learnable": False, "sparsity_lr_scale": 1.0, "mask_temperature": 0.3},
    "cdds": {"unet_depth": 3, "noise_groups": 2, "noise_std": 1.5, "alpha_m": 3.0, "alpha_f": 3.0,
             "alpha_x": 3.0, "threshold_alpha": 2.0, "threshold_learnable": False, "semantic_loss": "self",
             "column_temperature": 2.0, "kl_temperature": 2.0, "kl_scale": "raw", "mask_temperature": 0.3,
             "mask_scale": "raw"},
}
OWN_ROWS = [(method, row) for method in ALTERNATIVES for row in METHODS[method].ablations
            if row.method == method]
INERT = [(method, row, key) for method, row in OWN_ROWS
         for key in sorted(METHODS[method].inert(METHODS[method].parse_section(row.overrides)))]


def fingerprint(method: str, section: dict) -> tuple:
    """What training sees of a configuration: the loss on one batch, the trainable parameters and
    the optimiser's groups (same seed for building and for the forward pass's noise)."""
    torch.manual_seed(0)
    model = build_model(job_for(method, section), IMAGE_DIM)
    batch = random_batch()
    loss = model.loss_terms(model(batch), batch["image_ids"], 1).total().item()
    shapes = tuple((name, tuple(p.shape)) for name, p in model.named_parameters())
    groups = tuple((g.get("name"), g["lr"], len(g["params"])) for g in model.param_groups(1e-3, 0.1))
    return round(loss, 6), shapes, groups


def changed(method: str, overrides: dict, key: str) -> bool:
    value, context = ALTERNATIVES[method][key] if isinstance(ALTERNATIVES[method][key], tuple) \
        else (ALTERNATIVES[method][key], {})
    before = {**overrides, **context}
    return fingerprint(method, before) != fingerprint(method, {**before, key: value})


def test_every_searchable_key_has_an_alternative_and_every_row_switches_something_off():
    for method, alternatives in ALTERNATIVES.items():
        assert set(alternatives) == set(METHODS[method].searchable)
    assert {(m, r.name) for m, r, _ in INERT} == {(m, r.name) for m, r in OWN_ROWS if r.overrides}


@pytest.mark.parametrize("method, key", sorted({(m, k) for m, _, k in INERT}))
def test_each_key_a_row_drops_matters_in_full(method, key):
    assert changed(method, {}, key), f"{method}.{key} changes nothing even with every part on"


@pytest.mark.parametrize("method, row, key", INERT, ids=lambda x: getattr(x, "name", x))
def test_a_dropped_key_changes_nothing_in_its_row(method, row, key):
    assert not changed(method, dict(row.overrides), key), f"{row.name} drops {method}.{key} but reads it"


# --------------------------------------------------------------------------------------------------
# Resume: finished row searches are read, not searched again
# --------------------------------------------------------------------------------------------------


def test_search_rows_skips_finished_rows_and_stops_at_an_interrupted_one(smoke_study, monkeypatch, tmp_path):
    plan = plan_ablation(smoke_study("method=dias", "ablation.variants=[full, w/o L_dim, base]"), tune_rows=2)
    done = {"params": ["train.lr"], "trial_id": "t0", "values": {"train.lr": 1e-4}, "rsum": 50.0}
    plan = replace(plan, source={**plan.source, "rows": {"full": done}})
    calls = []

    def fake(plan_, row, parent):
        calls.append(row)
        return None if row == "base" else {**done, "trial_id": f"t-{row}"}

    monkeypatch.setattr(row_search, "run_row_search", fake)
    assert row_search.search_rows(plan, tmp_path, "parent") is None  # base was interrupted
    assert calls == ["w/o L_dim", "base"]
    stored = json.loads((tmp_path / "ablation.json").read_text())["source"]["rows"]
    assert list(stored) == ["full", "w/o L_dim"] and stored["full"] == done  # finished rows recorded
    calls.clear()
    monkeypatch.setattr(row_search, "run_row_search", lambda p, row, parent: calls.append(row) or done)
    resumed = row_search.search_rows(replace(plan, source={**plan.source, "rows": stored}), tmp_path, "p")
    assert calls == ["base"] and list(resumed.source["rows"]) == ["full", "w/o L_dim", "base"]


# --------------------------------------------------------------------------------------------------
# End to end: two rows, two trials each, one seed; interrupted after the first row's search, resumed
# --------------------------------------------------------------------------------------------------


class Stop(Exception):
    """Stands for the driver dying between two row searches."""


@pytest.mark.slow
def test_two_rows_get_their_own_search_and_resume_skips_a_finished_one(smoke_study, ray_session, monkeypatch):
    from mlflow.tracking import MlflowClient

    from study.ablation.run import resume_ablation, run_ablation

    study = smoke_study("method=dias", "data.max_images=100", "train.epochs=1", "train.max_steps_per_epoch=3",
                        "ablation.variants=[full, base]", "ablation.seeds=[0]")
    real = row_search.run_row_search

    def die_at_base(plan, row, parent):
        if row == "base":
            raise Stop
        return real(plan, row, parent)

    monkeypatch.setattr(row_search, "run_row_search", die_at_base)
    with pytest.raises(Stop):
        run_ablation(study, tune_rows=2)
    ablation_dir = Path(study.storage.path) / "smoke-ablation"
    first = json.loads((ablation_dir / "ablation.json").read_text())["source"]
    assert list(first["rows"]) == ["full"]
    full_csv = (ablation_dir / "tune" / "full" / "results.csv").read_text()

    monkeypatch.setattr(row_search, "run_row_search", real)
    outcome = resume_ablation(study)
    assert not outcome.interrupted and len(describe_source(outcome.source)) == 2
    source = json.loads((ablation_dir / "ablation.json").read_text())["source"]
    assert source["tune_rows"] == 2 and source["rows"]["full"] == first["rows"]["full"]  # not searched again
    assert (ablation_dir / "tune" / "full" / "results.csv").read_text() == full_csv
    for row, slug in (("full", "full"), ("base", "base")):  # each row's values = its own search's best trial
        table = pd.read_csv(ablation_dir / "tune" / slug / "results.csv", dtype={"trial_id": str})
        best = table.sort_values("rsum", ascending=False).iloc[0]
        entry = source["rows"][row]
        assert len(table) == 2 and entry["trial_id"] == best.trial_id
        assert entry["rsum"] == pytest.approx(best.rsum)
        assert entry["values"] == pytest.approx({k: best[k] for k in entry["values"]})
    assert set(source["rows"]["full"]["values"]) == shipped("dias")
    assert set(source["rows"]["base"]["values"]) == {"train.lr"}

    trials = pd.read_csv(ablation_dir / "results.csv")
    assert sorted(zip(trials.variant, trials.method, trials.status)) == [
        ("base", "base", "completed"), ("full", "dias", "completed")]
    assert (ablation_dir / "ablation.md").is_file()

    client = MlflowClient(study.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(study.tracking.experiment).experiment_id])
    parent = next(r for r in runs if r.data.tags.get("kind") == "ablation")
    assert parent.data.tags["tune_rows"] == "2"
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    searches = [r for r in kids if r.data.tags["kind"] == "row-search"]
    assert sorted(r.data.tags["variant"] for r in searches) == ["base", "base", "full", "full"]
    best = {r.data.tags["variant"]: r.data.tags["trial_id"] for r in searches if r.data.tags.get("best")}
    assert best == {row: entry["trial_id"] for row, entry in source["rows"].items()}
    grid = {r.data.tags["variant"]: r.data.params for r in kids if r.data.tags["kind"] == "ablation-trial"}
    for row, params in grid.items():  # the grid trained each row at its own best values
        assert float(params["train.lr"]) == pytest.approx(source["rows"][row]["values"]["train.lr"])
    full = source["rows"]["full"]["values"]
    assert float(grid["full"]["dias.lambda_dim"]) == pytest.approx(full["dias.lambda_dim"])
