"""Search beyond one number (docs/search.md): warm start from the shipped defaults, multi-objective
studies with a Pareto set, Population Based Training of the loss weights.

Pure parts without Ray (config checks, warm-start points, the label Optuna's enqueued trials get,
Pareto marking against Optuna's own, the PBT space, the report's figures, MLflow's per-epoch weight
schedule); two small Ray studies end to end (``slow``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from study import tracking
from study.ablation.plan import plan_ablation
from study.config import validate
from study.report.build import build_report
from study.results import best_trial, non_dominated, pareto_column, pick_trial
from study.spaces import (
    WARM_START_KEY,
    ClipToSpace,
    DefineByRun,
    Param,
    resolve_space,
    warm_start_points,
)
from trainables.errors import ConfigError
from trainables.methods.dias.config import DiasConfig

MO = "search.metric=[rsum: max, gap_centroid_dist: min]"
DIAS_WEIGHTS = ("search.space=none", "search.params={dias.lambda_dim: {type: loguniform, low: 0.03, high: 100.0}, "
                "dias.lambda_inter: {type: loguniform, low: 0.1, high: 300.0}}")


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> str:
    """One sqlite store for this module's MLflow tests (creating one costs seconds); each test has
    its own experiment in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.fixture
def tracked_study(smoke_study, mlflow_db, request):
    def load(*overrides: str):
        return smoke_study(f"tracking.uri={mlflow_db}", f"tracking.experiment={request.node.name}", *overrides)

    return load


# --------------------------------------------------------------------------------------------------
# The study file's search section
# --------------------------------------------------------------------------------------------------


def test_objectives_parse_and_several_default_to_fifo(smoke_study):
    search = smoke_study(MO).search
    assert search.objectives == [("rsum", "max"), ("gap_centroid_dist", "min")] and search.multi_objective
    assert search.scheduler == "fifo" and search.primary == "rsum"
    assert smoke_study(MO, "search.scheduler=asha").search.scheduler == "asha"  # ASHA on the first objective
    single = smoke_study("search.metric=loss", "search.mode=min").search
    assert single.objectives == [("loss", "min")] and single.scheduler == "asha" and not single.multi_objective
    stored = smoke_study(MO, "search.warm_start=defaults")  # the resolved study.yaml validates again unchanged
    assert validate(stored.model_dump(mode="json"), "stored") == stored


def test_asha_on_several_objectives_ranks_on_the_first(smoke_study):
    from study.tuner import scheduler

    study = smoke_study(MO, "search.scheduler=asha", "search.space=none", "search.params={train.lr: [1.0e-3]}")
    asha = scheduler(study, resolve_space(study))
    assert (asha.metric, asha._mode) == ("rsum", "max")  # Tune's own metric stays unset for a metric list
    assert type(scheduler(smoke_study(MO), {})).__name__ == "FIFOScheduler"


@pytest.mark.parametrize("overrides, message", [
    (["search.metric=[rsum: max]"], "at least two"),
    (["search.metric=[rsum: max, rsum: min]"], "repeat a metric"),
    (["search.metric=[rsum: best, loss: min]"], "is not one 'name: max'"),
    (["search.metric=[rsum: max, r_sum: min]"], "'r_sum' is not a metric"),
    (["search.algorithm=pbt", MO], "PBT ranks a population by one metric"),
    (["search.algorithm=grid", MO], "several objectives need a sampler"),
    (["search.algorithm=grid", "search.warm_start=defaults"], "warm_start applies to optuna-tpe and random"),
    (["search.algorithm=pbt", "search.warm_start=defaults"], "warm_start applies to optuna-tpe and random"),
    (["search.warm_start=[7]"], "neither 'defaults' nor a partial config"),
    (["search.pbt.synch=true"], "search.pbt applies to algorithm pbt"),
])
def test_bad_search_settings_are_one_line(smoke_study, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        smoke_study(*overrides)
    assert "\n" not in str(err.value) and "(got {" not in str(err.value)


# --------------------------------------------------------------------------------------------------
# Warm start
# --------------------------------------------------------------------------------------------------


def test_defaults_point_is_the_shipped_values_of_every_searched_key(smoke_study):
    study = smoke_study("method=dias", "search.warm_start=[defaults, {dias.lambda_dim: 5.0}]")
    params = resolve_space(study)
    points = dict(warm_start_points(study, params))
    shipped = DiasConfig()
    assert points["defaults"] == {"train.lr": 5.0e-4, "dias.lambda_dim": shipped.lambda_dim,
                                  "dias.lambda_inter": shipped.lambda_inter, "dias.lambda_intra": shipped.lambda_intra,
                                  "dias.sparsity_k": shipped.sparsity_k, "dias.dim_loss": shipped.dim_loss}
    assert study.train.lr != 5.0e-4  # the smoke study's own lr is not what "defaults" means
    assert points["listed 2"] == {"dias.lambda_dim": 5.0}


def test_a_conditional_default_is_kept_only_where_its_parent_uses_it(smoke_study):
    study = smoke_study("search.warm_start=defaults")  # base: train.margin only when train.loss is triplet
    assert warm_start_points(study, resolve_space(study)) == [
        ("defaults", {"train.lr": 5.0e-4, "train.loss": "triplet", "train.margin": 0.2})]
    bad = smoke_study("search.warm_start=[{train.loss: infonce, train.margin: 0.3}]")
    with pytest.raises(ConfigError, match="train.margin is not used"):
        resolve_space(bad)


@pytest.mark.parametrize("point, message", [
    ("defaults", r"dias.lambda_dim=1.0 lies outside the search space \(loguniform 2 … 50\)"),
    ("[{dias.lambda_inter: 1.0}]", "'dias.lambda_inter' is not a parameter of the search space"),
    ("[{dias.lambda_dim: 1e-3}]", "a string: write numbers like 1.0e-3"),
])
def test_a_warm_start_point_outside_the_space_fails_before_ray(smoke_study, monkeypatch, point, message):
    import study.search as search

    monkeypatch.setattr(search, "connect", lambda *a, **k: pytest.fail("Ray must not start"))
    study = smoke_study("method=dias", "search.space=none", f"search.warm_start={point}",
                        "search.params={dias.lambda_dim: {type: loguniform, low: 2.0, high: 50.0}}")
    with pytest.raises(ConfigError, match=message):
        search.run_study(study)
    assert not Path(study.storage.path).exists()


def test_enqueued_points_come_first_and_are_labelled(smoke_study):
    """What OptunaSearch does with points_to_evaluate (enqueue_trial, then ask), without Ray."""
    study = smoke_study("search.warm_start=[defaults, {train.loss: infonce}]")
    params = resolve_space(study)
    points = warm_start_points(study, params)
    space = DefineByRun(params, points)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    for _, values in points:
        journal.enqueue_trial(values)
    labels, chosen = [], []
    for _ in range(4):
        trial = journal.ask()
        labels.append((space(trial) or {}).get(WARM_START_KEY))
        chosen.append(trial.params)
        journal.tell(trial, 1.0)
    assert labels == ["defaults", "listed 2", None, None]
    assert chosen[0] == points[0][1]
    assert chosen[1]["train.loss"] == "infonce" and "train.margin" not in chosen[1]  # the rest was sampled
    assert chosen[1]["train.lr"] != 5.0e-4


# --------------------------------------------------------------------------------------------------
# Several objectives: the Pareto set
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_pareto_set_is_optunas(seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 6, size=(25, 3)).astype(float)  # small integers: ties and duplicates
    maximize = [bool(b) for b in rng.integers(0, 2, size=3)]
    reference = optuna.create_study(directions=["maximize" if m else "minimize" for m in maximize])
    for row in values:
        reference.add_trial(optuna.trial.create_trial(values=list(row)))
    expected = sorted(t.number for t in reference.best_trials)
    assert sorted(np.flatnonzero(non_dominated(values, maximize))) == expected


def test_pareto_column_judges_completed_trials_and_pick_rules():
    table = pd.DataFrame([
        {"trial_id": "a", "status": "completed", "rsum": 90.0, "gap_centroid_dist": 0.9},
        {"trial_id": "b", "status": "completed", "rsum": 80.0, "gap_centroid_dist": 0.5},
        {"trial_id": "c", "status": "completed", "rsum": 70.0, "gap_centroid_dist": 0.7},  # dominated by b
        {"trial_id": "d", "status": "early-stopped", "rsum": 95.0, "gap_centroid_dist": 0.1},  # fewer epochs
        {"trial_id": "e", "status": "failed", "rsum": float("nan"), "gap_centroid_dist": float("nan")}])
    objectives = [("rsum", "max"), ("gap_centroid_dist", "min")]
    assert list(table.loc[pareto_column(table, objectives), "trial_id"]) == ["a", "b"]
    assert pick_trial(table, objectives, None)[0]["trial_id"] == "a"
    assert pick_trial(table, objectives, "best:gap_centroid_dist")[0]["trial_id"] == "b"
    chosen, how = pick_trial(table, objectives, "trial:c")
    assert chosen["trial_id"] == "c" and "not in the Pareto set" in how
    for rule, message in (("best:loss", "expected best:METRIC"), ("trial:zz", "no trial 'zz'"), ("rsum", "expected")):
        with pytest.raises(ConfigError, match=message):
            pick_trial(table, objectives, rule)


def test_ablate_from_a_pareto_study_takes_the_picked_trial(smoke_study):
    study = smoke_study("method=dias", "ablation.variants=[full, base]")
    source = smoke_study("method=dias", MO)
    study_dir = Path(study.storage.path) / "trade-off"
    study_dir.mkdir(parents=True)
    (study_dir / "study.yaml").write_text(yaml.safe_dump(source.model_dump(mode="json")))
    (study_dir / "space.yaml").write_text(yaml.safe_dump({"method": "dias", "params": {
        "dias.lambda_dim": {"type": "loguniform", "low": 0.1, "high": 30.0}}}))
    (study_dir / "mlflow_parent.json").write_text(json.dumps({"run_id": "unused"}))
    pd.DataFrame([{"trial_id": "a", "status": "completed", "dias.lambda_dim": 1.0, "rsum": 90.0,
                   "gap_centroid_dist": 0.9, "pareto": True},
                  {"trial_id": "b", "status": "completed", "dias.lambda_dim": 7.0, "rsum": 80.0,
                   "gap_centroid_dist": 0.5, "pareto": True}]).to_csv(study_dir / "results.csv", index=False)
    default = plan_ablation(study, from_study="trade-off")
    assert default.source["trial_id"] == "a" and "best rsum in the Pareto set" in default.source["pick"]
    plan = plan_ablation(study, from_study="trade-off", pick="best:gap_centroid_dist")
    assert plan.source["trial_id"] == "b" and plan.jobs["full"]["method_params"]["lambda_dim"] == 7.0
    with pytest.raises(ConfigError, match="--pick chooses a trial of the --from-study study"):
        plan_ablation(study, pick="best:rsum")


# --------------------------------------------------------------------------------------------------
# Population Based Training
# --------------------------------------------------------------------------------------------------


def test_pbt_space_holds_loss_weights_only(smoke_study):
    study = smoke_study("method=dias", "search.algorithm=pbt", *DIAS_WEIGHTS)
    assert set(resolve_space(study)) == {"dias.lambda_dim", "dias.lambda_inter"}
    for overrides, message in ((["method=dias", "search.algorithm=pbt"], "train.lr, dias.sparsity_k"),
                               (["search.algorithm=pbt"], "method 'base' has none")):
        with pytest.raises(ConfigError, match=message):
            resolve_space(smoke_study(*overrides))


def test_pbt_mutations_come_from_the_space_and_stay_inside_it(smoke_study):
    from ray.tune.search.sample import Categorical, Float, Integer

    from study.tuner import pbt_scheduler, tune_domain

    params = {"a": Param(type="loguniform", low=0.1, high=10.0), "b": Param(type="uniform", low=0.0, high=1.0),
              "c": Param(type="int", low=1, high=4), "d": Param(type="categorical", choices=[1, 2, 4])}
    domains = {name: tune_domain(p) for name, p in params.items()}
    assert isinstance(domains["a"], Float) and (domains["a"].lower, domains["a"].upper) == (0.1, 10.0)
    draws = np.array(domains["a"].sample(size=2000, random_state=0))
    assert draws.min() >= 0.1 and draws.max() <= 10.0 and 0.7 < np.median(draws) < 1.4  # log-uniform: median 1
    assert isinstance(domains["c"], Integer) and (domains["c"].lower, domains["c"].upper) == (1, 5)
    assert isinstance(domains["d"], Categorical) and domains["d"].categories == [1, 2, 4]
    clip = ClipToSpace(params)
    assert clip({"a": 12.0, "b": -0.2, "c": 5, "d": 4}) == {"a": 10.0, "b": 0.0, "c": 4, "d": 4}
    study = smoke_study("method=dias", "search.algorithm=pbt", *DIAS_WEIGHTS,
                        "search.pbt={perturbation_interval: 2, quantile_fraction: 0.5, resample_probability: 0.1}")
    pbt = pbt_scheduler(study, resolve_space(study))
    assert set(pbt._hyperparam_mutations) == {"dias.lambda_dim", "dias.lambda_inter"}  # no public getter
    assert (pbt._perturbation_interval, pbt._quantile_fraction, pbt._resample_probability) == (2, 0.5, 0.1)


def test_trial_runs_log_the_weight_schedule_per_epoch(mlflow_db):
    client, experiment_id = tracking.client_for(mlflow_db, "pbt-schedule")
    parent = client.create_run(experiment_id).info.run_id
    runs = tracking.TrialRuns(mlflow_db, "pbt-schedule", parent, "pbt", "dias", {}, 3, schedule=("dias.lambda_dim",))
    runs.started("t1", {"dias.lambda_dim": 1.0, WARM_START_KEY: "defaults"})
    for step, weight in enumerate((1.0, 1.2, 0.3), 1):  # an exploit/explore step after epoch 2
        runs.reported("t1", {"training_iteration": step, "rsum": 50.0 + step, "config": {"dias.lambda_dim": weight}})
    runs.close()
    run = client.get_run(runs.runs["t1"])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "hp/dias.lambda_dim"))
    assert history == [(1, 1.0), (2, 1.2), (3, 0.3)] and run.data.tags[WARM_START_KEY] == "defaults"


# --------------------------------------------------------------------------------------------------
# The report: Pareto front, warm-start lines, PBT schedules (constructed study directories)
# --------------------------------------------------------------------------------------------------


def study_dir_on_disk(study, params: dict) -> Path:
    """What ``study run`` leaves before any results (``tests/test_report.py``), for this study's algorithm."""
    from tests.test_report import study_dir_on_disk as on_disk

    return on_disk(study, params, study.search.algorithm)


def test_report_of_a_pareto_study_draws_optunas_front_and_marks_warm_start(tracked_study):
    study = tracked_study(MO, "search.warm_start=defaults")
    lr = {"type": "loguniform", "low": 1e-5, "high": 1e-2}
    study_dir = study_dir_on_disk(study, {"train.lr": lr})
    rows = [("t0", 1e-3, 90.0, 0.9, "defaults"), ("t1", 3e-4, 80.0, 0.4, ""), ("t2", 1e-4, 60.0, 0.8, "")]
    journal = optuna.create_study(study_name=study.name, directions=["maximize", "minimize"], storage=(
        optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(study_dir / "optuna.journal")))))
    for _, value, rsum, gap, _ in rows:
        journal.add_trial(optuna.trial.create_trial(
            params={"train.lr": value}, values=[rsum, gap],
            distributions={"train.lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}))
    table = pd.DataFrame([{"trial_id": t, "status": "completed", WARM_START_KEY: w, "train.lr": v, "rsum": r,
                           "gap_centroid_dist": g} for t, v, r, g, w in rows])
    table["pareto"] = pareto_column(table, study.search.objectives)
    table.to_csv(study_dir / "results.csv", index=False)
    report = build_report(study_dir)
    assert (study_dir / "report" / "pareto.png").stat().st_size > 1000
    assert (study_dir / "report" / "history.png").stat().st_size > 1000
    section = report.markdown.split("## Pareto set (2 trials, best rsum first)")[1].split("##")[0]
    assert [line.split("|")[2].strip() for line in section.splitlines() if line.startswith("| ")][1:] == ["t0", "t1"]
    assert "Warm start 'defaults': trial t0 (completed), rsum 90; best rsum − this = +0.0." in report.markdown
    assert "Pareto front (rsum vs gap_centroid_dist; Optuna)" in (study_dir / "report" / "index.html").read_text()


def test_report_of_a_pbt_study_draws_each_trials_weight_schedule(tracked_study):
    study = tracked_study("method=dias", "search.algorithm=pbt", *DIAS_WEIGHTS, "train.epochs=3")
    params = resolve_space(study)
    study_dir = study_dir_on_disk(study, {k: v.model_dump(exclude_defaults=True) for k, v in params.items()})
    schedules = {"a": [1.0, 1.0, 1.0], "b": [2.0, 1.2, 1.2]}  # b cloned a after epoch 1 (values × 1.2)
    lines = [{"trial_id": t, "training_iteration": i + 1, "epoch": i + 1, "dias.lambda_dim": w,
              "dias.lambda_inter": 20.0} for t, weights in schedules.items() for i, w in enumerate(weights)]
    (study_dir / "schedules.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines[::-1]))
    pd.DataFrame([{"trial_id": t, "status": "completed", "dias.lambda_dim": w[-1], "dias.lambda_inter": 20.0,
                   "rsum": 53.0 - i} for i, (t, w) in enumerate(schedules.items())]).to_csv(
        study_dir / "results.csv", index=False)
    from study.report.trial_dirs import read_schedules

    read = read_schedules(study_dir / "schedules.jsonl", ["a", "b"], ["dias.lambda_dim"])
    assert list(read["epoch"]) == [1, 2, 3, 1, 2, 3]  # sorted per trial whatever the file's order
    assert list(read.loc[read["changed"], ["trial_id", "epoch"]].itertuples(index=False)) == [("b", 2)]
    report = build_report(study_dir)
    assert (study_dir / "report" / "schedules.png").stat().st_size > 1000
    assert "Weight schedules of the top 2 trials by rsum (PBT)" in (study_dir / "report" / "index.html").read_text()
    assert any("this is a PBT study" in note for note in report.notes)


# --------------------------------------------------------------------------------------------------
# End to end: Ray local on 2 CPUs, MLflow on sqlite in a temp dir
# --------------------------------------------------------------------------------------------------

QUICK = ["data.max_images=100", "resources.max_concurrent_trials=2"]


@pytest.mark.slow
def test_warm_started_pareto_study(tracked_study, ray_session):
    from study.report.plots import load_optuna_study
    from study.search import run_study

    study = tracked_study(*QUICK, MO, "train.epochs=1", "train.max_steps_per_epoch=4", "search.num_samples=2",
                          "search.warm_start=defaults")
    outcome = run_study(study)
    table = pd.read_csv(outcome.results_csv, dtype={"trial_id": str}).fillna({WARM_START_KEY: ""})
    assert len(table) == 2 and (table["status"] == "completed").all()
    # Optuna's first trial is the enqueued defaults point; results.csv labels the same trial.
    first = min(load_optuna_study(outcome.study_dir / "optuna.journal", study.name).trials, key=lambda t: t.number)
    assert first.params == {"train.lr": 5.0e-4, "train.loss": "triplet", "train.margin": 0.2}
    defaults = table[table[WARM_START_KEY] == "defaults"].iloc[0]
    assert (defaults["train.lr"], defaults["train.loss"]) == (5.0e-4, "triplet")
    assert sorted(table[WARM_START_KEY]) == ["", "defaults"]
    assert best_trial(table, "rsum", "max")["rsum"] >= defaults["rsum"]  # the search never ends below the paper
    # The Pareto set: results.csv, the outcome and MLflow agree with a recomputation.
    expected = set(table.loc[pareto_column(table.drop(columns="pareto"), study.search.objectives), "trial_id"])
    assert expected and set(table.loc[table["pareto"], "trial_id"]) == expected
    assert {row["trial_id"] for row in outcome.pareto} == expected and outcome.best is None
    client = MlflowClient(study.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(study.tracking.experiment).experiment_id])
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parent = next(r for r in runs if r.data.tags.get("kind") == "study")
    assert {k.data.tags["trial_id"] for k in kids if k.data.tags.get("pareto") == "true"} == expected
    assert set(parent.data.tags["pareto_trial_ids"].split(",")) == expected and "best_trial_id" not in parent.data.tags
    assert sorted(k.data.tags.get(WARM_START_KEY, "") for k in kids) == ["", "defaults"]
    report = build_report(outcome.study_dir)
    assert (outcome.study_dir / "report" / "pareto.png").stat().st_size > 1000 and "Pareto set" in report.markdown


@pytest.mark.slow
def test_pbt_exploits_continue_the_history_with_the_new_weights(tracked_study, ray_session):
    from study.search import run_study

    study = tracked_study(*QUICK, "method=dias", "train.epochs=2", "train.max_steps_per_epoch=4",
                          "search.algorithm=pbt", *DIAS_WEIGHTS, "search.num_samples=2",
                        "search.pbt={perturbation_interval: 1, quantile_fraction: 0.5, synch: true}")
    outcome = run_study(study)
    table = pd.read_csv(outcome.results_csv, dtype={"trial_id": str})
    assert len(table) == 2 and (table["status"] == "completed").all() and (table["epochs"] == 2).all()
    params = resolve_space(study)
    schedules = [json.loads(line) for line in (outcome.study_dir / "schedules.jsonl").read_text().splitlines()]
    client = MlflowClient(study.tracking.uri)
    kids = {r.data.tags["trial_id"]: r for r in client.search_runs(
        [client.get_experiment_by_name(study.tracking.experiment).experiment_id])
        if "mlflow.parentRunId" in r.data.tags}
    changed = 0
    for trial_id in table["trial_id"]:
        rows = sorted((r for r in schedules if r["trial_id"] == trial_id), key=lambda r: r["training_iteration"])
        # A restart from another trial's checkpoint continues its history: epoch k is iteration k.
        assert [r["training_iteration"] for r in rows] == [1, 2] == [int(r["epoch"]) for r in rows]
        curves = {key: dict((m.step, m.value) for m in client.get_metric_history(kids[trial_id].info.run_id, key))
                  for key in ("loss", "loss_align", "loss_dim", "loss_inter", "loss_intra", *(f"hp/{n}" for n in params))}
        for before, row in zip([None, *rows], rows):
            step = row["training_iteration"]
            assert all(params[n].low <= row[n] <= params[n].high for n in params)
            assert all(curves[f"hp/{n}"][step] == pytest.approx(row[n]) for n in params)  # MLflow's schedule
            # The epoch's loss is formed with that epoch's weights: a new weight applies from the restart on.
            weights = {"dim": row["dias.lambda_dim"], "inter": row["dias.lambda_inter"], "intra": study.dias.lambda_intra}
            total = curves["loss_align"][step] + sum(w * curves[f"loss_{t}"][step] for t, w in weights.items())
            assert curves["loss"][step] == pytest.approx(total, rel=1e-4)
            changed += before is not None and any(before[n] != row[n] for n in params)
    # Synchronous PBT, 2 trials, quantile 0.5: after epoch 1 the worse one cloned the better one (not
    # after the last epoch: LastEpochKeptPBT).
    assert changed == 1
    build_report(outcome.study_dir)
    assert (outcome.study_dir / "report" / "schedules.png").stat().st_size > 1000
