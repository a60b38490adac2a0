"""cluster/: a real 1-head + 2-worker Ray cluster on this machine (cluster/local.sh) with token
authentication, a study submitted as a Ray Job (cluster/submit.sh), and the driver-side checks a
cluster needs. The cluster is separate from the session's `ray_session` and on its own ports."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from study.layout import study_dir_of
from trainables.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LOCAL, SUBMIT, MLFLOW = (ROOT / "cluster" / name for name in ("local.sh", "submit.sh", "mlflow-server.sh"))
RAY = str(Path(sys.executable).parent / "ray")


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))  # all interfaces: Ray's GCS and raylets listen on all of them
        except OSError:
            return False
    return True


def free_port_block(size: int = 40) -> int:
    """A base of ``size`` free ports below the ephemeral range, at random so two test runs on one
    machine (or a developer's own cluster on 6379/8265) do not collide."""
    for _ in range(100):
        base = random.randrange(20000, 32000 - size, 10)
        if all(port_free(p) for p in range(base, base + size)):
            return base
    raise RuntimeError("no block of free ports in 20000-32000")


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's ray/python
    return env


def exported(state_file: Path) -> dict[str, str]:
    """The ``export NAME=value`` lines of cluster.env: what a user gets from ``. cluster.env``."""
    return dict(re.findall(r"^export (\w+)=(.*)$", state_file.read_text(), re.M))


def node_pids(state_file: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r'^NODE_PIDS=.* (\d+)"', state_file.read_text(), re.M)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def local_cluster():
    """``cluster/local.sh up`` (head with 0 CPUs, two 1-CPU workers); always ``down`` afterwards."""
    state_dir = Path(tempfile.mkdtemp(prefix="itmc-", dir="/tmp"))  # short: Ray's socket paths live below it
    base = free_port_block()
    env = {**base_env(), "CLUSTER_DIR": str(state_dir), "GCS_PORT": str(base), "DASHBOARD_PORT": str(base + 1),
           "PORT_BASE": str(base + 10), "WORKERS": "2", "WORKER_CPUS": "1", "HEAD_CPUS": "0"}
    state_file, pids = state_dir / "cluster.env", []
    try:
        up = subprocess.run([str(LOCAL), "up"], env=env, capture_output=True, text=True, timeout=300)
        pids = node_pids(state_file) if state_file.exists() else []
        assert up.returncode == 0, up.stdout + up.stderr[-3000:]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        yield {**env, **exported(state_file)}
    finally:
        if state_file.exists():
            pids = node_pids(state_file)
        down = subprocess.run([str(LOCAL), "down"], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)
        assert down.returncode == 0, down.stderr[-2000:]
        assert not [p for p in pids if alive(p)], f"cluster nodes still running: {pids}"


def study_job(client_env: dict, tmp_path: Path, *more: str) -> tuple[str, list[str], dict]:
    """The job id, ``cluster/submit.sh`` command and environment of a smoke study job (4 trials, 1
    epoch, 100 images, 2 at once) with its data, results and MLflow in ``tmp_path``; ``more``
    overrides come last."""
    from trainables.data import write_synth

    write_synth(tmp_path / "synth", images=200)
    job_id = f"itm-test-{uuid.uuid4().hex[:8]}"
    overrides = [f"data.root={tmp_path / 'synth'}", f"storage.path={tmp_path / 'results'}",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", "search.num_samples=4", "train.epochs=1",
                 "data.max_images=100", "resources.max_concurrent_trials=2", "resources.cpus_per_worker=1", *more]
    args = [str(SUBMIT), str(ROOT / "studies" / "smoke.yaml"), *[a for o in overrides for a in ("--set", o)]]
    return job_id, args, {**client_env, "SUBMIT_ARGS": f"--submission-id {job_id}"}


def run_study_job(client_env: dict, tmp_path: Path) -> tuple[str, subprocess.CompletedProcess]:
    job_id, args, env = study_job(client_env, tmp_path)
    return job_id, subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_study_job_runs_trials_on_both_workers_and_lands_in_mlflow(local_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    job_id, submit = run_study_job(local_cluster, tmp_path)
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
    status = subprocess.run([RAY, "job", "status", job_id], env=local_cluster, capture_output=True, text=True,
                            timeout=120)
    assert f"Job '{job_id}' succeeded" in status.stdout  # the CLI's words for JobStatus.SUCCEEDED

    table = pd.read_csv(tmp_path / "results" / "smoke" / "results.csv")
    assert len(table) == 4 and (table["status"] == "completed").all()
    # The head offers 0 CPUs and each worker 1: two concurrent 1-CPU trials need both workers.
    nodes = set(table["node_id"])
    assert len(nodes) == 2, nodes

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("itm-study-smoke")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(kids) == 4
    assert {k.data.tags["mlflow.parentRunId"] for k in kids} == {parents[0].info.run_id}
    assert {k.data.tags["trial_id"] for k in kids} == set(table["trial_id"])
    assert {k.data.tags["node_id"] for k in kids} == nodes


UPLOAD_CHECK = """
import json, os, study, trainables.data
print("UPLOAD", json.dumps({"code": [os.path.dirname(m.__file__) for m in (study, trainables.data)],
      "cwd": os.getcwd(), "left_out": [p for p in ("data", "results", ".venv", ".git") if os.path.exists(p)]}))
"""


@pytest.mark.slow
def test_the_job_runs_the_uploaded_repo_without_data_or_results(local_cluster):
    job = subprocess.run([str(SUBMIT), "--", "python", "-c", UPLOAD_CHECK], env=local_cluster,
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    seen = json.loads(re.search(r"^UPLOAD (.*)$", job.stdout, re.M).group(1))
    # All code from the job's working_dir copy (trainables/data too), none from this checkout.
    assert all(path.startswith(seen["cwd"]) for path in seen["code"]), seen
    assert seen["left_out"] == []


@pytest.mark.slow
@pytest.mark.parametrize("token", [None, "0" * 64], ids=["no-token", "wrong-token"])
def test_a_job_without_the_clusters_token_is_refused(local_cluster, token, tmp_path):
    env = {**base_env(), "RAY_ADDRESS": local_cluster["RAY_ADDRESS"], "HOME": str(tmp_path),  # no ~/.ray token
           "RAY_AUTH_MODE": "token" if token else "disabled", **({"RAY_AUTH_TOKEN": token} if token else {})}
    job = subprocess.run([RAY, "job", "submit", "--", "python", "-c", "print('ran')"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert job.returncode != 0
    assert ("Invalid authentication token" if token else "Missing authentication token") in job.stdout + job.stderr
    assert "ran" not in job.stdout


def test_local_cluster_refuses_ports_in_use_and_leaves_nothing(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**base_env(), "CLUSTER_DIR": str(tmp_path / "c"), "GCS_PORT": str(port)}
        up = subprocess.run([str(LOCAL), "up"], env=env, capture_output=True, text=True, timeout=60)
    assert up.returncode == 1 and f"port {port} is in use" in up.stderr
    assert not (tmp_path / "c" / "cluster.env").exists()


@pytest.mark.parametrize("script, args", [(LOCAL, []), (LOCAL, ["sideways"]), (SUBMIT, []), (MLFLOW, ["-h"])])
def test_scripts_print_usage(script, args):
    out = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.startswith(f"usage: cluster/{script.name}")


def test_scripts_refuse_bad_paths_in_one_line(tmp_path):
    outside = tmp_path / "study.yaml"
    outside.write_text("name: x\n")
    for args, words in [([SUBMIT, outside], "is outside"), ([SUBMIT, "resume", "results/x"], "absolute path"),
                        ([MLFLOW, tmp_path / "none.db"], "no MLflow database")]:
        out = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and words in out.stderr and out.stderr.count("\n") == 1, out.stderr


def smoke(storage: str):
    from study.config import load_study

    return load_study(ROOT / "studies" / "smoke.yaml", [f"storage.path={storage}"])


def test_storage_uri_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="storage.path 's3://bucket/r'.*NFS") as err:
        study_dir_of(smoke("s3://bucket/r"))
    assert "\n" not in str(err.value)


def test_relative_storage_in_a_ray_job_is_refused(tmp_path, monkeypatch):
    # In a Ray Job the cwd is the job's per-node copy of the uploaded working_dir, so a relative
    # storage.path (made absolute when the study file is loaded) points into that copy.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="storage.path 'results' resolves inside the Ray job's working_dir"):
        study_dir_of(smoke("results"))
    shared = tmp_path.parent / "shared"
    assert study_dir_of(smoke(str(shared))) == shared / "smoke"
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # a plain driver on one machine: a local dir is fine
    assert study_dir_of(smoke("results")) == tmp_path / "results" / "smoke"


def test_connect_joins_an_address_without_resource_counts(monkeypatch):
    import ray

    from study import ray_session

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    ray_session.connect("10.0.0.1:6379")
    assert calls[0]["address"] == "10.0.0.1:6379"
    assert not {"num_cpus", "num_gpus", "resources"} & set(calls[0])
    with pytest.raises(ConfigError, match="dashboard .job submission. address"):
        ray_session.connect("http://10.0.0.1:8265")
    assert len(calls) == 1


def test_connect_explains_a_refused_token_in_one_line(monkeypatch):
    import ray

    from study import ray_session

    def refuse(**kwargs):  # what ray.init raises after the GCS rejected the token (Ray 2.60)
        try:
            raise RuntimeError("Failed to connect to GCS. ... RPC error: InvalidAuthToken: token is missing")
        except RuntimeError as cause:
            raise ConnectionError(f"Failed to connect to Ray cluster at {kwargs['address']}") from cause

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_session, "probe", lambda address: None)  # a head answers on the port
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConfigError, match="refused this driver's token: set RAY_AUTH_MODE=token"):
        ray_session.connect("10.0.0.1:6379")

    def not_ray(**kwargs):  # something answers on the port, but no Ray head
        raise ConnectionError("no route to host")

    monkeypatch.setattr(ray, "init", not_ray)
    with pytest.raises(ConfigError, match="no Ray head answered there"):
        ray_session.connect("10.0.0.1:6379")


# --------------------------------------------------------------------------------------------------
# Faults at cluster scale (issue 14): the tracking server goes away mid-study; a worker node is lost
# mid-study. The node-loss test kills a worker of the module's cluster, so it stays the file's last.
# --------------------------------------------------------------------------------------------------

FAULT_STUDY = ("train.epochs=3", "search.scheduler=fifo")  # every trial runs every epoch


def started_job(client_env: dict, tmp_path: Path, *more: str) -> tuple[subprocess.Popen, Path]:
    """A fault study (4 trials × 3 epochs, 2 at once) submitted in the background; its log file."""
    _, args, env = study_job(client_env, tmp_path, *FAULT_STUDY, *more)
    log = tmp_path / "job.log"
    with open(log, "w") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT), log


def finished(job: subprocess.Popen, log: Path) -> str:
    returncode = job.wait(timeout=900)
    output = log.read_text()
    assert returncode == 0, output[-4000:]
    return output


def wait_for(what: str, check, timeout: float = 300, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"no {what} after {timeout:.0f}s")


def reported(trial_dir: Path) -> list[dict]:
    """The trial's result.json lines (as the driver wrote them so far)."""
    try:
        lines = (trial_dir / "result.json").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):  # not written yet, or a line half-written
        return []


def mlflow_epochs(uri: str) -> tuple[list, dict[str, list[int]]]:
    """The study's child runs, and per trial id the steps of its rsum curve."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("itm-study-smoke")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return runs, {k.data.tags["trial_id"]: sorted(m.step for m in client.get_metric_history(k.info.run_id, "rsum"))
                  for k in kids}


def assert_every_epoch_once(uri: str, table: pd.DataFrame) -> list:
    """One parent, one child per trial of ``table``, each with epochs 1..3 exactly once; the children."""
    runs, epochs = mlflow_epochs(uri)
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(kids) == len(table) == 4 and set(epochs) == set(table["trial_id"])
    assert all(steps == [1, 2, 3] for steps in epochs.values()), epochs
    assert {k.info.status for k in kids} == {"FINISHED"} and {k.data.tags["status"] for k in kids} == {"completed"}
    return kids


@pytest.mark.slow
def test_a_tracking_server_outage_mid_study_loses_no_metric(local_cluster, tmp_path):
    """``mlflow server`` is killed once the first epoch reached it and restarted after a trial started
    and epochs were reported without it: the job succeeds and MLflow holds every epoch once."""
    from study import tracking_buffer as tb
    from study.cli import main
    from tests.test_tracking_outage import MlflowServer

    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    buffer = tmp_path / "results" / "smoke" / tb.BUFFER_FILE

    def kept() -> list[str]:
        return [json.loads(line)["op"] for line in buffer.read_text().splitlines()] if buffer.exists() else []

    job = None
    try:
        job, log = started_job(local_cluster, tmp_path, f"tracking.uri={server.uri}")
        wait_for("epoch in MLflow", lambda: any(mlflow_epochs(server.uri)[1].values()))
        server.stop()
        outage = time.time()
        wait_for("trial started during the outage", lambda: "create_run" in kept() and kept().count("log") >= 3)
        outage = time.time() - outage
        server.start()
        output = finished(job, log)

        assert "is unreachable" in output and "is back: sent" in output, output[-3000:]
        state = json.loads((buffer.parent / tb.STATE_FILE).read_text())
        assert state["sent"] == len(kept()) > 0 and state["rejected"] == []  # the driver sent them itself
        table = pd.read_csv(tmp_path / "results" / "smoke" / "results.csv")
        assert (table["status"] == "completed").all()
        assert_every_epoch_once(server.uri, table)
        assert main(["sync", str(buffer.parent)]) == 0  # nothing left, nothing sent twice
        assert_every_epoch_once(server.uri, table)
        print(f"outage {outage:.0f} s, {len(kept())} events kept and sent")
    finally:
        server.stop()
        if job is not None and job.poll() is None:
            job.kill()


def session_of(node_pid: int) -> list[int]:
    """Every process of a node: ``local.sh`` starts each with setsid, and Ray's raylet and the
    workers it starts (each in a process group of its own) stay in that session."""
    table = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, sid in (line.split() for line in table.splitlines()) if int(sid) == node_pid]


def lose_node(node_pid: int) -> None:
    """A machine lost at once: SIGKILL to the node's process group, then to the rest of its session."""
    os.killpg(node_pid, signal.SIGKILL)
    for pid in session_of(node_pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_a_lost_worker_node_costs_no_trial_and_no_epoch(local_cluster, tmp_path):
    """One worker node is killed while a trial on it has an epoch checkpoint and epochs to go: the
    trial is retried on the other node from that checkpoint, every trial completes, and MLflow has
    exactly one child per trial with every epoch once."""
    _, *workers = node_pids(Path(local_cluster["CLUSTER_DIR"]) / "cluster.env")
    assert len(workers) == 2 and all(alive(pid) for pid in workers)
    job, log = started_job(local_cluster, tmp_path)
    study_dir = tmp_path / "results" / "smoke"
    try:
        lost_trial(job, log, study_dir, workers, tmp_path)
    finally:
        if job.poll() is None:
            job.kill()


def lost_trial(job: subprocess.Popen, log: Path, study_dir: Path, workers: list[int], tmp_path: Path) -> None:
    """Wait for a trial with an epoch checkpoint on a worker, lose that node, check the outcome."""

    def checkpointed_on_a_worker():
        for trial in study_dir.glob("trial_*"):
            lines = reported(trial)
            if 1 <= len(lines) < 3 and any(trial.glob("checkpoint_*")):
                try:
                    node = os.getsid(lines[-1]["pid"])
                except ProcessLookupError:
                    continue
                if node in workers:
                    return trial, node, lines
        return None

    trial, node, before = wait_for("trial with a checkpoint and epochs to go", checkpointed_on_a_worker)
    lost = time.time()
    lose_node(node)
    finished(job, log)

    table = pd.read_csv(study_dir / "results.csv", dtype={"trial_id": str})
    assert len(table) == 4 and (table["status"] == "completed").all(), table
    trial_id = trial.name.removeprefix("trial_")
    moved_to = table.set_index("trial_id").loc[trial_id, "node_id"]
    assert moved_to != before[-1]["node_id"]  # finished on the surviving node
    after = reported(trial)[len(before):]
    # Resumed from its last checkpoint: the epochs after the loss continue the count, none is repeated.
    assert [line["epoch"] for line in before + after] == [1, 2, 3], [line["epoch"] for line in before + after]
    assert after[0]["iterations_since_restore"] == 1
    kids = assert_every_epoch_once(f"sqlite:///{tmp_path / 'mlruns.db'}", table)
    assert {k.data.tags["trial_id"]: k.data.tags["node_id"] for k in kids}[trial_id] == moved_to
    print(f"node lost after epoch {len(before)} of trial {trial_id}; job done {time.time() - lost:.0f} s later")
