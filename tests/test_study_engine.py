"""The study engine end to end: Ray local on 2 CPUs, MLflow on sqlite in a temp dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from study.search import resume_study, run_study

pytestmark = pytest.mark.slow
QUICK = ["data.max_images=150", "resources.max_concurrent_trials=2"]


def children(study) -> list:
    client = MlflowClient(study.tracking.uri)
    experiment = client.get_experiment_by_name(study.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags], [r for r in runs if r.data.tags.get("kind") == "study"]


def test_four_trial_study_lands_in_mlflow(smoke_study, ray_session):
    study = smoke_study(*QUICK, "search.num_samples=4")
    outcome = run_study(study)
    assert outcome.n_trials == 4 and not outcome.interrupted and outcome.best is not None
    kids, parents = children(study)
    assert len(parents) == 1 and len(kids) == 4
    assert {k.data.tags["mlflow.parentRunId"] for k in kids} == {parents[0].info.run_id}
    client = MlflowClient(study.tracking.uri)
    for kid in kids:
        assert "train.lr" in kid.data.params and kid.data.params["data.max_images"] == "150"
        assert kid.data.tags["status"] in ("completed", "early-stopped")
        curve = client.get_metric_history(kid.info.run_id, "rsum")
        assert 1 <= len(curve) <= study.train.epochs and "gap_centroid_dist" in kid.data.metrics
    best = [k for k in kids if k.data.tags.get("best") == "true"]
    assert len(best) == 1 and best[0].data.tags["trial_id"] == parents[0].data.tags["best_trial_id"]
    table = pd.read_csv(outcome.results_csv)
    assert len(table) == 4 and table["rsum"].max() == pytest.approx(outcome.best["rsum"])


def test_asha_stops_hopeless_trials_early(smoke_study, ray_session):
    # Half the grid cannot learn (lr 1e-9); run one at a time so ASHA has rung results to compare.
    study = smoke_study(*QUICK, "resources.max_concurrent_trials=1", "search.algorithm=grid", "search.space=none",
                        "search.params={train.lr: [1.0e-3, 1.0e-9], train.seed: [0, 1, 2]}",
                        "search.reduction_factor=2", "train.epochs=3")
    outcome = run_study(study)
    table = pd.read_csv(outcome.results_csv)
    assert len(table) == 6
    hopeless = table[table["train.lr"] < 1e-6]
    assert (hopeless["status"] == "early-stopped").all() and (hopeless["epochs"] < 3).all()
    assert (table["status"] == "completed").sum() >= 1


def test_failed_and_nan_trials_are_recorded_while_the_study_finishes(smoke_study, ray_session):
    study = smoke_study(*QUICK, "search.algorithm=grid", "search.space=none", "search.max_failures=0",
                        "search.scheduler=fifo", "train.loss=triplet", "train.grad_clip=1.0e+12",
                        "search.params={train.lr: [1.0e-3, 1.0e+12], model.text_encoder: [tiny, /no/such/model]}")
    outcome = run_study(study)
    table = pd.read_csv(outcome.results_csv)
    assert sorted(table["status"]) == ["completed", "failed", "failed", "failed"]
    assert outcome.best is not None and outcome.best["train.lr"] == 1e-3
    errors = {k.data.tags.get("error", "") for k in children(study)[0] if k.data.tags["status"] == "failed"}
    assert any("non-finite loss" in e for e in errors)
    assert any("/no/such/model" in e for e in errors)
    assert all(len(e.splitlines()) == 1 for e in errors)


def wait_for_finished_trial(study_dir: Path, epochs: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for result in study_dir.glob("trial_*/result.json"):
            if len(result.read_text().splitlines()) >= epochs:
                return
        time.sleep(1)
    raise AssertionError(f"no trial finished in {timeout}s")


def test_interrupted_study_resumes_without_repeating_trials(smoke_study, ray_session, tmp_path):
    import ray

    overrides = [*QUICK, "resources.max_concurrent_trials=1", "search.num_samples=3", "search.scheduler=fifo"]
    study = smoke_study(*overrides)
    study_dir = Path(study.storage.path) / study.name
    args = [sys.executable, "-m", "study", "run", str(Path(__file__).parents[1] / "studies" / "smoke.yaml")]
    for item in (f"data.root={study.data.root}", f"storage.path={study.storage.path}",
                 f"tracking.uri={study.tracking.uri}", *overrides):
        args += ["--set", item]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # join the test's Ray
    driver = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_finished_trial(study_dir, study.train.epochs, timeout=240)
        driver.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and the driver exits
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    finished = {p.parent.name: p.read_text() for p in study_dir.glob("trial_*/result.json")
                if len(p.read_text().splitlines()) >= study.train.epochs}
    assert finished, driver.stderr.read()[-2000:]

    outcome = resume_study(study_dir)
    table = pd.read_csv(outcome.results_csv)
    assert len(table) == 3 and not outcome.interrupted
    for name, text in finished.items():  # finished trials were not run again
        assert (study_dir / name / "result.json").read_text() == text
    kids, parents = children(study)
    assert len(parents) == 1 and len(kids) == 3 and len({k.data.tags["trial_id"] for k in kids}) == 3
    assert parents[0].info.status == "FINISHED"


def kill_trial_after_first_epoch(study_dir: Path, killed: list, timeout: float = 180) -> None:
    import json

    deadline = time.time() + timeout
    while time.time() < deadline and not killed:
        for result in study_dir.glob("trial_*/result.json"):
            lines = result.read_text().splitlines()
            if lines:
                pid = json.loads(lines[0])["pid"]
                os.kill(pid, signal.SIGKILL)  # the trial's worker process dies mid-study
                killed.append(pid)
                return
        time.sleep(0.2)


def test_killed_trial_process_resumes_from_its_last_epoch(smoke_study, ray_session):
    import json
    import threading

    study = smoke_study(*QUICK, "search.num_samples=1", "search.scheduler=fifo", "search.max_failures=1",
                        "train.epochs=4")
    killed: list[int] = []
    killer = threading.Thread(target=kill_trial_after_first_epoch,
                              args=(Path(study.storage.path) / study.name, killed), daemon=True)
    killer.start()
    outcome = run_study(study)
    killer.join(timeout=5)
    assert killed, "the trial process was never killed"
    table = pd.read_csv(outcome.results_csv)
    assert list(table["status"]) == ["completed"] and table["epochs"].iloc[0] == 4
    rows = [json.loads(line) for path in (Path(study.storage.path) / study.name).glob("trial_*/result.json")
            for line in path.read_text().splitlines()]
    assert rows[-1]["epoch"] == 4 and rows[-1]["pid"] != killed[0]
    assert rows[-1]["iterations_since_restore"] < 4  # continued from a checkpoint, not from scratch


def test_multi_worker_trial_trains_with_ddp_through_ray_train(smoke_study, ray_session):
    study = smoke_study(*QUICK, "search.num_samples=1", "search.scheduler=fifo", "resources.workers_per_trial=2")
    outcome = run_study(study)
    table = pd.read_csv(outcome.results_csv)
    assert list(table["status"]) == ["completed"] and table["rsum"].iloc[0] > 0
    kids, _ = children(study)
    assert len(kids) == 1 and len(MlflowClient(study.tracking.uri).get_metric_history(kids[0].info.run_id, "rsum")) == 2
