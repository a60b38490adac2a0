"""Device and precision choices: the CUDA decisions are pure functions, tested here on the CPU with
Ray's assignment faked, and bf16 autocast runs the same training step on CPU so the mixed-precision
path is exercised without a GPU."""

import contextlib
import os

import pytest
import torch

from tests.test_methods import IMAGE_DIM, job_for, random_batch
from trainables import device as devices
from trainables.device import autocast, autocast_dtype, choose_device, memory_fraction, resolve_device
from trainables.errors import ITMError
from trainables.loop import TrainStep
from trainables.methods import METHODS, build_model

CUDA0, CUDA1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")


def test_precision_policy():
    assert autocast_dtype(CUDA0, "auto", bf16_native=True) == torch.bfloat16
    assert autocast_dtype(CPU, "auto") is None
    assert autocast_dtype(CUDA0, "fp32", bf16_native=True) is None
    assert autocast_dtype(CPU, "bf16") == torch.bfloat16


def test_auto_precision_takes_bf16_only_where_the_gpu_computes_it_natively():
    """A V100 or T4 only emulates bf16: auto stays in fp32 there; an explicit bf16 is still bf16."""
    assert autocast_dtype(CUDA0, "auto", bf16_native=False) is None
    assert autocast_dtype(CUDA0, "bf16", bf16_native=False) == torch.bfloat16


def test_native_bf16_asks_without_emulation(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: asked.append(kw) or False)
    monkeypatch.setattr(torch.cuda, "device", lambda _device: contextlib.nullcontext())
    devices.native_bf16.cache_clear()
    try:
        assert autocast_dtype(torch.device("cuda", 7), "auto") is None
    finally:
        devices.native_bf16.cache_clear()
    assert asked == [{"including_emulation": False}]


@pytest.mark.parametrize("gpu_ids, visible, expected", [
    ([], "0,1", CPU),                  # a 0-GPU trial on a GPU node: Ray 2.60 leaves the GPUs visible
    ([], None, CPU),
    ([1], "1", CUDA0),                 # Ray narrowed CUDA_VISIBLE_DEVICES to the trial's GPU
    (["3"], "2,3", CUDA1),             # ids may come as strings; the index is the place in the list
    ([2], None, torch.device("cuda", 2)),  # Ray set no CUDA_VISIBLE_DEVICES: the id is the index
])
def test_the_device_is_what_ray_assigned(gpu_ids, visible, expected):
    assert resolve_device(gpu_ids, cuda_available=True, visible_devices=visible) == expected


def test_a_train_worker_takes_ray_trains_device_only_with_gpus():
    assert resolve_device([5], True, "4,5", ray_device=CUDA1) == CUDA1
    assert resolve_device([], True, "0", ray_device=CUDA0) == CPU  # Ray Train's fallback is cuda:0


def test_an_assigned_gpu_that_cuda_cannot_use_is_one_line():
    with pytest.raises(ITMError, match="Ray assigned GPU 0 to this worker, but torch .* cannot use CUDA"):
        resolve_device([0], cuda_available=False)
    with pytest.raises(ITMError, match="CUDA_VISIBLE_DEVICES=1 hides it"):
        resolve_device([0], cuda_available=True, visible_devices="1")


def test_memory_is_capped_only_for_fractional_gpus():
    assert memory_fraction(0.5) == 0.5 and memory_fraction(0.25) == 0.25
    assert memory_fraction(0) is None and memory_fraction(1) is None and memory_fraction(2) is None


def test_cap_memory_sets_the_fraction_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    devices.cap_memory(CPU, 0.5)
    devices.cap_memory(CUDA0, 1)
    devices.cap_memory(CUDA0, 0.5)
    assert calls == [(0.5, CUDA0)]


@pytest.mark.parametrize("gpu_ids, gpus, train_worker, expected", [
    ([], 0, False, CPU),    # smoke / demo trial on a GPU node
    ([], 0, True, CPU),     # a CPU Train worker on a GPU node
    ([0], 1, False, CUDA0),
    ([1], 1, True, CUDA1),  # Ray Train's get_device() decides the index
])
def test_ray_trials_and_workers_use_the_assignment(monkeypatch, gpu_ids, gpus, train_worker, expected):
    from trainables import ray_train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(ray_train.ray, "get_gpu_ids", lambda: gpu_ids)
    monkeypatch.setattr(ray_train, "get_device", lambda: CUDA1)
    monkeypatch.setattr(ray_train, "cap_memory", lambda device, fraction: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, gpu_ids)) or "0,1")
    assert ray_train.assigned_device(gpus, train_worker=train_worker) == expected


def test_a_fractional_trial_is_capped_at_its_share(monkeypatch):
    from trainables import ray_train

    capped = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray_train.ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: capped.append((f, d)))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert ray_train.assigned_device(0.25, train_worker=False) == CUDA0
    assert capped == [(0.25, CUDA0)]


def test_train_workers_learn_their_gpu_share(tmp_path):
    from trainables.config import JobConfig
    from trainables.ray_train import WorkerResources, build_trainer

    trainer = build_trainer(JobConfig(), WorkerResources(1, 1, 0.5), name="t", storage_path=str(tmp_path))
    assert trainer.train_loop_config["gpus_per_worker"] == 0.5


def test_a_plain_process_follows_the_hardware():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_device().type == expected


def test_deterministic_switch_sets_and_clears_torch_state(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        devices.set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        devices.set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_switch_off_costs_nothing_when_it_is_already_off(monkeypatch):
    """``use_deterministic_algorithms`` imports torch._inductor's config (seconds): every fit calls
    ``set_deterministic``, so with the switch off and nothing to undo it must not be called."""
    calls = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: calls.append(a))
    devices.set_deterministic(False)
    assert calls == []


def test_fit_turns_determinism_on_before_building_the_model(smoke_study, monkeypatch):
    from trainables import loop

    class Built(Exception):
        pass

    def build(*args):
        raise Built(torch.are_deterministic_algorithms_enabled())

    monkeypatch.setattr(loop, "build_model", build)
    try:
        for flag in (True, False):
            with pytest.raises(Built) as seen:
                loop.fit(smoke_study(f"train.deterministic={flag}").job(), reporter=None)
            assert seen.value.args == (flag,)
    finally:
        torch.use_deterministic_algorithms(False)


def test_every_method_trains_under_deterministic_algorithms():
    """No op of any method's step lacks a deterministic implementation on the CPU (warn_only=False
    would raise), and two seeded steps agree exactly."""
    try:
        torch.use_deterministic_algorithms(True)
        for method in METHODS:
            grads = []
            for _ in range(2):
                torch.manual_seed(0)
                model = build_model(job_for(method), IMAGE_DIM).train()
                TrainStep(model)(random_batch(), 1).total().backward()
                grads.append([p.grad for p in model.parameters() if p.grad is not None])
            assert all(torch.equal(a, b) for a, b in zip(*grads)), method
    finally:
        torch.use_deterministic_algorithms(False)


def test_bf16_autocast_training_step_is_finite_for_every_method():
    device = torch.device("cpu")
    for method in METHODS:
        torch.manual_seed(0)
        model = build_model(job_for(method), IMAGE_DIM)
        with autocast(device, "bf16"):
            losses = TrainStep(model)(random_batch(), 1)
        total, terms = losses.total(), losses.terms
        total.backward()
        assert torch.isfinite(total) and all(torch.isfinite(t) for t in terms.values()), method
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()), method
