"""Device and precision choices: the CUDA decisions are pure functions, and bf16 autocast runs the
same training step on CPU so the mixed-precision path is exercised without a GPU."""

import torch

from tests.test_methods import IMAGE_DIM, job_for, random_batch
from trainables.device import autocast, autocast_dtype, choose_device
from trainables.loop import TrainStep
from trainables.methods import METHODS, build_model


def test_precision_policy():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert autocast_dtype(cuda, "auto") == torch.bfloat16 and autocast_dtype(cpu, "auto") is None
    assert autocast_dtype(cuda, "fp32") is None and autocast_dtype(cpu, "bf16") == torch.bfloat16


def test_device_follows_the_hardware():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert choose_device().type == expected


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
