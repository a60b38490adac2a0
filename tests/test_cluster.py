"""cluster/: a real 1-head + 2-worker Ray cluster on this machine (cluster/local.sh) with token
authentication, a study submitted as a Ray Job (cluster/submit.sh), and the driver-side checks a
cluster needs. The cluster is separate from the session's `ray_session` and on its own ports."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
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


def run_study_job(client_env: dict, tmp_path: Path) -> tuple[str, subprocess.CompletedProcess]:
    from trainables.data import write_synth

    write_synth(tmp_path / "synth", images=200)
    job_id = f"itm-test-{uuid.uuid4().hex[:8]}"
    overrides = [f"data.root={tmp_path / 'synth'}", f"storage.path={tmp_path / 'results'}",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", "search.num_samples=4", "train.epochs=1",
                 "data.max_images=100", "resources.max_concurrent_trials=2", "resources.cpus_per_worker=1"]
    args = [str(SUBMIT), str(ROOT / "studies" / "smoke.yaml"), *[a for o in overrides for a in ("--set", o)]]
    env = {**client_env, "SUBMIT_ARGS": f"--submission-id {job_id}"}
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
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConfigError, match="refused this driver's token: set RAY_AUTH_MODE=token"):
        ray_session.connect("10.0.0.1:6379")
    def unreachable(**kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(ray, "init", unreachable)
    with pytest.raises(ConnectionError, match="no route"):  # other connection errors stay Ray's own
        ray_session.connect("10.0.0.1:6379")
