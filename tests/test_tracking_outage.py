"""MLflow as a side service: an outage of any length loses no metric and never raises into Tune
(``study/tracking_buffer.py``), ``study sync`` sends what is left exactly once, and a failed command's
runs end FAILED (``tracking.fail_open_runs``). ``TrialRuns`` is driven directly (no Ray): against a
closed port and sqlite (fast), and against a real ``mlflow server`` stopped and restarted (slow)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from study import tracking
from study import tracking_buffer as tb
from study.cli import main

EXPERIMENT = "itm-outage"


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def runs_for(uri: str, parent: str, folder: Path | None, epochs: int = 2) -> tracking.TrialRuns:
    return tracking.TrialRuns(uri, EXPERIMENT, parent, "outage", "base", {"data.max_images": "100"}, epochs,
                              folder=folder)


def epoch(runs: tracking.TrialRuns, trial: str, step: int) -> None:
    runs.reported(trial, {"training_iteration": step, "rsum": 100.0 + 10 * step, "loss": 1.0 / step,
                          "node_id": f"node-{trial}"})


def children(client: MlflowClient, parent: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


def curves(client: MlflowClient, parent: str) -> dict[str, list[tuple[int, float]]]:
    """trial id -> its rsum history as (step, value), sorted."""
    return {run.data.tags["trial_id"]: sorted((m.step, m.value)
                                              for m in client.get_metric_history(run.info.run_id, "rsum"))
            for run in children(client, parent)}


def new_parent(uri: str) -> str:
    client, experiment_id = tracking.client_for(uri, EXPERIMENT)
    return client.create_run(experiment_id, run_name="parent", tags={"kind": "study"}).info.run_id


def a_study(uri: str):
    """What ``start_parent_run`` reads of a study."""
    return SimpleNamespace(name="outage", method="base", tracking=SimpleNamespace(uri=uri, experiment=EXPERIMENT),
                           model_dump=lambda mode: {"train": {"epochs": 2, "lr": 0.001}})


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Fast: an unreachable URI (closed port), sent later to a sqlite store with `sync --uri`
# --------------------------------------------------------------------------------------------------


def test_an_unreachable_mlflow_never_raises_and_costs_one_short_try(tmp_path, capsys):
    runs = runs_for(f"http://127.0.0.1:{closed_port()}", "parent-id", tmp_path)
    first = timed(runs.started, "t0", {"train.lr": 0.01})
    rest = [timed(epoch, runs, "t0", 1), timed(epoch, runs, "t0", 2), timed(runs.completed, "t0"),
            timed(runs.started, "t1", {"train.lr": 0.1}), timed(runs.failed, "t1", "RuntimeError: boom")]
    # One short try (MLflow's default retries a refused connection for ~4 min), then only appends.
    assert first < 2 and max(rest) < 0.5, (first, rest)
    kept = (tmp_path / tb.BUFFER_FILE).read_text().splitlines()
    ops = [json.loads(line)["op"] for line in kept]
    assert ops == ["create_run", "log", "log", "log", "log", "status", "create_run", "log", "log", "status"]
    assert runs.outbox.pending() == len(kept)
    assert capsys.readouterr().err.count("is unreachable") == 1  # said once, not per event


def test_the_end_line_names_the_count_and_the_sync_command(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    runs = runs_for(uri, "parent-id", tmp_path)
    runs.started("t0", {"train.lr": 0.01})
    epoch(runs, "t0", 1)
    line = runs.close()
    assert line == (f"MLflow at {uri} was unreachable: 3 events kept in {tmp_path / tb.BUFFER_FILE}; "
                    f"send them with `python -m study sync {tmp_path}`")


def test_sync_sends_every_kept_event_once_even_after_a_crash_mid_sync(tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    parent = new_parent(store)
    runs = runs_for(f"http://127.0.0.1:{closed_port()}", parent, tmp_path / "study", epochs=3)
    for trial in ("t0", "t1"):
        runs.started(trial, {"train.lr": 0.01})
        for step in (1, 2, 3):
            epoch(runs, trial, step)
        runs.completed(trial)
    assert main(["sync", str(tmp_path / "study"), "--uri", store]) == 0
    assert "sent 14 events" in capsys.readouterr().out

    client = MlflowClient(store)
    expected = {t: [(s, 100.0 + 10 * s) for s in (1, 2, 3)] for t in ("t0", "t1")}
    assert curves(client, parent) == expected
    kids = children(client, parent)
    assert {k.info.status for k in kids} == {"FINISHED"} and {k.data.tags["status"] for k in kids} == {"completed"}
    assert {k.data.params["train.lr"] for k in kids} == {"0.01"}

    # A sync that died after sending but before recording it: everything is sent again, nothing doubles.
    state_file = tmp_path / "study" / tb.STATE_FILE
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "sent": 0, "ids": {}}))
    assert main(["sync", str(tmp_path / "study"), "--uri", store]) == 0
    assert curves(client, parent) == expected and len(children(client, parent)) == 2
    assert main(["sync", str(tmp_path / "study"), "--uri", store]) == 0
    assert "sent 0 events" in capsys.readouterr().out
    # The Tune state now names the real runs, not the keys they were buffered under.
    assert set(runs.get_state()["runs"].values()) == {k.info.run_id for k in kids}


def test_sync_says_when_mlflow_is_still_away_and_when_there_is_nothing(tmp_path, capsys):
    runs = runs_for(f"http://127.0.0.1:{closed_port()}", "parent-id", tmp_path / "study")
    runs.started("t0", {})
    assert main(["sync", str(tmp_path / "study")]) == 1
    assert "still unreachable: 2 events kept" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["sync", str(tmp_path / "empty")]) == 0
    assert "nothing to send" in capsys.readouterr().out


def test_a_parent_started_during_an_outage_is_created_with_its_children(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.yaml").write_text("name: outage\n")
    study = a_study(f"http://127.0.0.1:{closed_port()}")
    folder = tmp_path / "study"
    parent = tracking.start_parent_run(study, "outage", "study", folder, [folder / "study.yaml"])
    assert parent.startswith(tb.KEY_PREFIX)
    runs = runs_for(study.tracking.uri, parent, tmp_path / "study")
    runs.started("t0", {})
    epoch(runs, "t0", 1)
    assert tracking.close_parent(study.tracking.uri, EXPERIMENT, folder, parent).startswith("MLflow at")
    assert tb.sync(tmp_path, uri=store)[0][1:3] == (7, 0)  # every buffer below the folder given

    client = MlflowClient(store)
    (real,) = [r for r in client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
               if r.data.tags.get("kind") == "study"]
    assert real.info.status == "FINISHED" and real.data.params["train.epochs"] == "2"
    assert [a.path for a in client.list_artifacts(real.info.run_id)] == ["study.yaml"]
    assert curves(client, real.info.run_id) == {"t0": [(1, 110.0)]}


def test_a_resumed_driver_keeps_the_buffer_and_the_trial_map(tmp_path):
    """Tune pickles the callback with its ``TrialRuns`` and restores its state in a new driver."""
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    parent = new_parent(store)
    runs = runs_for(f"http://127.0.0.1:{closed_port()}", parent, tmp_path)
    runs.started("t0", {})
    epoch(runs, "t0", 1)
    again = pickle.loads(pickle.dumps(runs))
    again.set_state(runs.get_state())
    again.uri = again.outbox.uri = store  # the server is back (here: the same store, reached directly)
    epoch(again, "t0", 2)  # still behind the kept events: appended, sent in order with them
    again.completed("t0")
    assert again.close() is None and again.outbox.pending() == 0
    assert curves(MlflowClient(store), parent) == {"t0": [(1, 110.0), (2, 120.0)]}


def test_an_event_mlflow_refuses_is_left_out_with_a_warning(tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    runs = runs_for(store, new_parent(store), tmp_path)
    runs.started("t0", {"train.lr": 0.01})
    runs.outbox.log(runs.runs["t0"], params={"train.lr": "0.02"})  # a param cannot change its value
    epoch(runs, "t0", 1)
    assert "MLflow refused a log event" in capsys.readouterr().err
    assert runs.outbox.pending() == 0 and not (tmp_path / tb.BUFFER_FILE).exists()
    assert MlflowClient(store).get_run(runs.runs["t0"]).data.metrics["rsum"] == 110.0


# --------------------------------------------------------------------------------------------------
# fail_open_runs: a failed command's parent and open children end FAILED
# --------------------------------------------------------------------------------------------------


def family(store: str) -> tuple[MlflowClient, dict[str, str]]:
    """A parent with a running, a finished and a failed child, and another study's running child."""
    client, experiment_id = tracking.client_for(store, EXPERIMENT)
    parent, other = new_parent(store), new_parent(store)
    ids = {"parent": parent, "other_parent": other}
    for name, status, of in [("running", None, parent), ("finished", "FINISHED", parent),
                             ("failed", "FAILED", parent), ("elsewhere", None, other)]:
        ids[name] = client.create_run(experiment_id, tags={"mlflow.parentRunId": of}).info.run_id
        if status:
            client.set_terminated(ids[name], status)
    return client, ids


@pytest.mark.parametrize("given", ["uri", "client"])
def test_fail_open_runs_fails_the_parent_and_its_open_children_only(tmp_path, given):
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client, ids = family(store)
    tracking.fail_open_runs(store if given == "uri" else client, EXPERIMENT, ids["parent"], error="ValueError: x")
    status = {name: client.get_run(run).info.status for name, run in ids.items()}
    assert status == {"parent": "FAILED", "other_parent": "RUNNING", "running": "FAILED", "finished": "FINISHED",
                      "failed": "FAILED", "elsewhere": "RUNNING"}
    assert client.get_run(ids["parent"]).data.tags["error"] == "ValueError: x"
    tracking.fail_open_runs(store, EXPERIMENT, ids["parent"], error="later")  # a finished parent stays as it is
    assert client.get_run(ids["parent"]).data.tags["error"] == "ValueError: x"


def test_fail_open_runs_never_raises_and_is_kept_while_mlflow_is_away(tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client, ids = family(store)
    away = f"http://127.0.0.1:{closed_port()}"
    tracking.fail_open_runs(away, EXPERIMENT, ids["parent"])  # no folder: a warning
    assert "not marked FAILED" in capsys.readouterr().err
    tracking.fail_open_runs(away, EXPERIMENT, ids["parent"], error="boom", folder=tmp_path / "study")
    assert client.get_run(ids["running"]).info.status == "RUNNING"
    tb.sync(tmp_path / "study", uri=store)
    assert [client.get_run(ids[n]).info.status for n in ("parent", "running", "elsewhere")] == \
        ["FAILED", "FAILED", "RUNNING"]


# --------------------------------------------------------------------------------------------------
# Slow: a real `mlflow server` stopped and restarted while TrialRuns writes to it
# --------------------------------------------------------------------------------------------------


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 over one sqlite store; ``stop`` and ``start`` keep port and store."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, closed_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.folder / "server.log", "a") as log:
            self.process = subprocess.Popen(
                [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlruns.db'}",
                 "--artifacts-destination", str(self.folder / "mlartifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.25)
        raise TimeoutError(f"mlflow server not up after {timeout}s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # a crash: nothing flushed, no goodbye
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture
def server(tmp_path):
    running = MlflowServer(tmp_path)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.mark.slow
def test_a_server_outage_mid_study_loses_no_metric_and_flushes_when_it_is_back(server, tmp_path, monkeypatch):
    monkeypatch.setattr(tb, "RETRY_AFTER_S", 1.0)
    parent = new_parent(server.uri)
    runs = runs_for(server.uri, parent, tmp_path / "study")
    runs.started("t0", {"train.lr": 0.01})
    epoch(runs, "t0", 1)

    server.stop()
    calls = [timed(runs.started, "t1", {"train.lr": 0.1}), timed(epoch, runs, "t0", 2),
             timed(epoch, runs, "t1", 1), timed(runs.completed, "t0")]
    assert sum(calls) < 15, calls  # MLflow's own retries would take minutes per call
    assert runs.outbox.pending() == 6

    server.start()
    time.sleep(1.1)  # past RETRY_AFTER_S: the next event sends the buffer first
    epoch(runs, "t1", 2)
    assert runs.outbox.pending() == 0
    runs.completed("t1")
    assert runs.close() is None

    client = MlflowClient(server.uri)
    assert curves(client, parent) == {"t0": [(1, 110.0), (2, 120.0)], "t1": [(1, 110.0), (2, 120.0)]}
    kids = children(client, parent)
    assert {k.info.status for k in kids} == {"FINISHED"}
    assert {k.data.tags["trial_id"]: k.data.tags["node_id"] for k in kids} == {"t0": "node-t0", "t1": "node-t1"}


@pytest.mark.slow
def test_a_study_that_ends_while_the_server_is_down_is_sent_by_sync(server, tmp_path, capsys):
    parent = tracking.start_parent_run(a_study(server.uri), "outage", "study", tmp_path / "study", [])
    runs = runs_for(server.uri, parent, tmp_path / "study")
    runs.started("t0", {})
    server.stop()
    for step in (1, 2):
        epoch(runs, "t0", step)
    runs.completed("t0")
    line = runs.close()
    assert f"4 events kept in {tmp_path / 'study' / tb.BUFFER_FILE}" in line and f"sync {tmp_path / 'study'}" in line

    server.start()
    assert main(["sync", str(tmp_path / "study")]) == 0
    assert main(["sync", str(tmp_path / "study")]) == 0
    assert "sent 0 events" in capsys.readouterr().out.splitlines()[-1]
    client = MlflowClient(server.uri)
    assert curves(client, parent) == {"t0": [(1, 110.0), (2, 120.0)]}
    assert client.get_run(children(client, parent)[0].info.run_id).info.status == "FINISHED"


def test_a_study_whose_mlflow_is_gone_at_the_end_still_finishes_and_keeps_the_close(tmp_path, capsys):
    # The trials are done and results.csv is written; an unreachable server must not fail the command
    # (it used to retry for minutes and end in a traceback): the parent's close waits in the buffer.
    from study import search
    from study.config import load_study
    from study.results import TrialRecord
    from study.spaces import resolve_space

    from tests.conftest import SMOKE

    study = load_study(str(SMOKE), ["tracking.uri=http://127.0.0.1:9", f"storage.path={tmp_path}",
                                              "search.num_samples=1"])
    done = TrialRecord("abc", {}, {"training_iteration": study.train.epochs, "rsum": 10.0}, "", False)
    outcome = search.finish(study, resolve_space(study), tmp_path, "parent123", [done])
    assert not outcome.interrupted and (tmp_path / "results.csv").is_file()
    kept = (tmp_path / "mlflow_buffer.jsonl").read_text().splitlines()
    assert len(kept) == 2  # the results.csv artifact and the FINISHED status of the parent
    assert "python -m study sync" in capsys.readouterr().out


def test_a_training_run_logged_while_mlflow_is_away_is_kept_and_synced(tmp_path):
    """``study train`` logs after a training that may have taken hours: an unreachable MLflow keeps
    the run in the run folder's buffer (the CLI prints the sync line) instead of losing it."""
    from study.train import log_run

    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    folder = tmp_path / "run"
    folder.mkdir()
    history = [{"epoch": 1.0, "rsum": 100.0, "loss": 0.5}, {"epoch": 2.0, "rsum": 120.0, "loss": 0.4}]
    line = log_run(a_study(f"http://127.0.0.1:{closed_port()}"), "outage-train-1", history, folder)
    assert line.startswith("MLflow at") and f"python -m study sync {folder}" in line
    assert tb.sync(tmp_path, uri=store)[0][2] == 0
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "train"
    assert run.data.params["train.lr"] == "0.001"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "rsum")] == [(1, 100.0), (2, 120.0)]
    assert log_run(a_study(store), "outage-train-2", history, tmp_path / "run2") is None  # reachable: nothing kept
