"""Shared fixtures: one synthetic benchmark and one local Ray session for the whole test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]

# Tiny models on 2 shared cores: one intra-op thread is faster and keeps runs deterministic
# (Ray workers get OMP_NUM_THREADS from their CPU share anyway).
torch.set_num_threads(1)
SMOKE = ROOT / "studies" / "smoke.yaml"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic benchmark shared by the training tests (train 400 / dev 100 / test 200)."""
    from trainables.data import write_synth

    root = tmp_path_factory.mktemp("synth-bench")
    write_synth(root, images=400, seed=0)
    return root


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray on 2 CPUs for every test that needs it (starting Ray costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}},
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()


@pytest.fixture
def smoke_study(synth_root, tmp_path):
    """``studies/smoke.yaml`` pointed at the shared benchmark, with results/MLflow in a temp dir."""
    from study.config import load_study

    def load(*overrides: str):
        return load_study(SMOKE, [f"data.root={synth_root}", f"storage.path={tmp_path / 'results'}",
                                  f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}", *overrides])

    return load
