"""Nothing hangs (issue 14): a trial no node could hold is refused in one line (on an autoscaling
cluster: asked for, and waited for with a timeout), an address where nothing answers fails in
seconds, and SIGTERM stops a study or a training run the way Ctrl+C does, resumable."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray.autoscaler.sdk

from study import ray_session
from study.config import ResourcesConfig
from tests.conftest import ROOT, SMOKE
from trainables.errors import ConfigError

TWO_CPUS = [{"CPU": 2.0}]
LOCAL_CLUSTER = [{"CPU": 0.0}, {"CPU": 1.0}, {"CPU": 1.0}]  # cluster/local.sh: a 0-CPU head, two 1-CPU workers
GPU_BOX = [{"CPU": 8.0, "GPU": 1.0}]
SPLIT = [{"CPU": 8.0}, {"CPU": 1.0, "GPU": 4.0}]  # the CPUs on one node, the GPUs on another

# (case id, cluster, resources section, what the refusal says; None = it fits)
PLACEMENTS = [
    ("fits", TWO_CPUS, {}, None),
    ("fractional-cpus-fit", TWO_CPUS, {"workers_per_trial": 4, "cpus_per_worker": 0.5}, None),
    ("spread-over-two-nodes", LOCAL_CLUSTER, {"workers_per_trial": 2}, None),
    ("more-workers-than-nodes-hold", LOCAL_CLUSTER, {"workers_per_trial": 3},
     "resources.workers_per_trial 3: a trial's workers (1 CPUs each) must run at once, and this Ray cluster "
     "(3 nodes, 2 CPUs) holds 2"),
    ("use-gpu-without-gpus", TWO_CPUS, {"use_gpu": True},
     "resources.use_gpu true: no node of this Ray cluster has a GPU"),
    ("more-gpus-than-a-node", GPU_BOX, {"gpus_per_worker": 2},
     "resources.gpus_per_worker 2: the largest node of this Ray cluster has 1 GPUs"),
    ("more-cpus-than-a-node", TWO_CPUS, {"cpus_per_worker": 4},
     "resources.cpus_per_worker 4: the largest node of this Ray cluster has 2 CPUs"),
    ("cpus-and-gpus-on-different-nodes", SPLIT, {"cpus_per_worker": 4, "gpus_per_worker": 1},
     "resources.cpus_per_worker 4 with gpus_per_worker 1: no node of this Ray cluster has both for one worker"),
    ("two-gpu-workers-one-gpu", GPU_BOX, {"workers_per_trial": 2, "gpus_per_worker": 1},
     "resources.workers_per_trial 2: a trial's workers (1 CPUs and 1 GPUs each) must run at once, and this "
     "Ray cluster (1 nodes, 8 CPUs, 1 GPUs) holds 1"),
    ("no-node-at-all", [], {}, "resources.cpus_per_worker 1: the largest node of this Ray cluster has 0 CPUs"),
]


@pytest.mark.parametrize("nodes, section, says", [p[1:] for p in PLACEMENTS], ids=[p[0] for p in PLACEMENTS])
def test_placement_problem_names_what_no_node_offers(nodes, section, says):
    assert ray_session.placement_problem(nodes, ResourcesConfig(**section)) == says


@pytest.fixture
def cluster(monkeypatch):
    """A fake cluster whose live nodes are ``cluster.nodes`` (one list per poll, the last repeated)."""
    state = SimpleNamespace(polls=[TWO_CPUS], requests=[], looks=0)

    def alive_nodes():
        state.looks += 1
        return state.polls.pop(0) if len(state.polls) > 1 else state.polls[0]

    monkeypatch.setattr(ray_session, "alive_nodes", alive_nodes)
    monkeypatch.setattr(ray_session, "POLL_S", 0.0)
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda **kw: state.requests.append(kw))
    monkeypatch.delenv(ray_session.AUTOSCALING_ENV, raising=False)
    return state


def test_a_fixed_cluster_refuses_in_one_line_and_never_waits(cluster):
    with pytest.raises(ConfigError) as err:
        ray_session.check_fits(ResourcesConfig(use_gpu=True))
    assert str(err.value).startswith("resources.use_gpu true: no node of this Ray cluster has a GPU")
    assert ray_session.AUTOSCALING_ENV in str(err.value) and "\n" not in str(err.value)
    assert cluster.requests == [] and cluster.looks == 1


def test_an_autoscaling_cluster_is_asked_for_the_workers_and_waited_for(cluster, monkeypatch, capsys):
    monkeypatch.setenv(ray_session.AUTOSCALING_ENV, "1")
    cluster.polls = [TWO_CPUS, TWO_CPUS, TWO_CPUS + GPU_BOX]  # the GPU node joins on the third look
    ray_session.check_fits(ResourcesConfig(workers_per_trial=1, gpus_per_worker=1, cpus_per_worker=4))
    assert cluster.requests == [{"bundles": [{"CPU": 4.0, "GPU": 1.0}]}, {"bundles": []}]  # asked, then withdrawn
    assert cluster.looks == 3
    assert "waiting up to 600 s" in capsys.readouterr().err


def test_an_autoscaling_cluster_that_never_grows_times_out_in_one_line(cluster, monkeypatch):
    monkeypatch.setenv(ray_session.AUTOSCALING_ENV, "1")
    monkeypatch.setenv(ray_session.AUTOSCALING_WAIT_ENV, "0")
    with pytest.raises(ConfigError, match=r"no node of this Ray cluster has a GPU, after waiting 0 s"):
        ray_session.check_fits(ResourcesConfig(use_gpu=True))
    assert cluster.requests[-1] == {"bundles": []}  # the request does not outlive the study


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def no_ray_init(monkeypatch):
    monkeypatch.setattr(ray_session, "ray", SimpleNamespace(
        is_initialized=lambda: False, init=lambda **kw: pytest.fail(f"ray.init must not run: {kw}")))


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_address_where_nothing_listens_fails_in_seconds(form, no_ray_init):
    address = form.format(port=closed_port())
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"RAY_ADDRESS {address}: nothing answers at 127.0.0.1:\d+ \("):
        ray_session.connect(address)
    assert time.monotonic() - start < ray_session.PROBE_TIMEOUT_S + 1


def test_the_probe_lets_a_listening_address_through():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        ray_session.probe(f"127.0.0.1:{server.getsockname()[1]}")
    ray_session.probe("auto")  # Ray resolves this one itself


@pytest.fixture
def handlers(monkeypatch):
    """Whatever a test installs for SIGINT/SIGTERM/SIGUSR1 (and sets in the environment) is put back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.delenv("TUNE_DISABLE_SIGINT_HANDLER", raising=False)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    ray_session.STOP.clear()  # what a signal here noted must not mark later studies in this process stopped


def fake_handler(calls, module):
    def handler(signum, frame):
        calls.append(signum)

    handler.__module__ = module  # Tune's lives in ray.tune.tune, Ray Train's in ray.train.v2....
    return handler


def deliver(sig) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.5)  # the handler runs between bytecodes of the main thread


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_first_stop_signal_ends_a_tune_run_gracefully_the_second_interrupts(handlers, sig):
    calls = []
    signal.signal(signal.SIGUSR1, fake_handler(calls, "ray.tune.tune"))  # what Tuner.fit installs
    ray_session.stop_gracefully()
    assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"  # so that Ctrl+C comes here, not to Tune
    deliver(sig)
    assert calls == [sig] and ray_session.stop_requested()
    with pytest.raises(KeyboardInterrupt):
        deliver(sig)
    assert calls == [sig]


@pytest.mark.parametrize("sigusr1", [signal.SIG_DFL, "ray-train"])
def test_a_stop_signal_outside_tune_is_a_keyboard_interrupt(handlers, sigusr1):
    if sigusr1 == "ray-train":
        sigusr1 = fake_handler([], "ray.train.v2.api.data_parallel_trainer")
    signal.signal(signal.SIGUSR1, sigusr1)
    ray_session.stop_gracefully()
    with pytest.raises(KeyboardInterrupt):
        deliver(signal.SIGTERM)
    assert ray_session.stop_requested()


def test_sigint_stops_a_driver_a_script_started_in_the_background(handlers):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # how a non-interactive shell starts `cmd &`
    ray_session.stop_gracefully()  # Tune's handler took SIGINT over regardless; so does this one
    assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is ray_session.on_stop_signal


def wait_for(pattern: str, root: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not any(root.glob(pattern)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {pattern} under {root} after {timeout} s"
        time.sleep(0.5)


# (command, signal, checkpoint glob under storage.path, what the interrupted command prints). Not
# SIGINT for train: Ray Train's own handler takes it over there (docs/cluster.md "When things go wrong").
STOPS = [
    ("run", signal.SIGTERM, "smoke/trial_*/checkpoint_*", "interrupted: continue with `python -m study resume "),
    ("run", signal.SIGINT, "smoke/trial_*/checkpoint_*", "interrupted: continue with `python -m study resume "),
    ("train", signal.SIGTERM, "smoke-train-*/checkpoint_*", " --resume`"),
]


@pytest.mark.slow
@pytest.mark.parametrize("command, sig, checkpoint, says", STOPS, ids=[f"{s[0]}-{s[1].name}" for s in STOPS])
def test_a_stop_signal_ends_it_in_seconds_and_keeps_what_resume_needs(command, sig, checkpoint, says, synth_root,
                                                                      tmp_path):
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "study", command, str(SMOKE), "--set", f"data.root={synth_root}",
            "--set", f"storage.path={results}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}",
            "--set", "train.epochs=50", "--set", "search.num_samples=2"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(checkpoint, results, proc, timeout=60)
        proc.send_signal(sig)
        start = time.monotonic()
        out, err = proc.communicate(timeout=30)
        stopped_in = time.monotonic() - start
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: this study's Ray processes only
    assert proc.returncode == 130, err[-3000:]
    assert says in out + err, (out + err)[-3000:]
    assert stopped_in < 20, stopped_in  # measured 4-6 s on the 2-core box; Ray's own path: abort (rc 134)
    assert any(results.glob(checkpoint))  # the epochs done so far survive
    if command == "run":
        from study.layout import load_study_dir

        study_dir = results / "smoke"
        assert (study_dir / "tuner.pkl").is_file()
        # both trials had started: Tune ends them like finished ones, the study still says interrupted
        assert "incomplete" in (study_dir / "results.csv").read_text()
        assert load_study_dir(study_dir)[2] == study_dir.resolve()  # `resume` finds everything it reads
