"""The epoch loop in a plain process and on Ray Train: it learns, checkpoints and resumes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables.config import DataConfig, JobConfig, ModelConfig
from trainables.data import PrecompSplit, build_eval_loaders
from trainables.errors import ConfigError
from trainables.evaluation import evaluate
from trainables.loop import evaluate_test, fit, seed_everything
from trainables.methods import METHODS, build_model
from trainables.reporters import LocalReporter
from trainables.text_models import load_tokenizer


def untrained_rsum(job) -> float:
    seed_everything(job.train.seed)
    val = PrecompSplit(job.data.root, job.data.val_split, job.data.max_images)
    model = build_model(job, val.feature_dim)
    loaders = build_eval_loaders(job.data, val, load_tokenizer(job.model.text_encoder), 256)
    return evaluate(model, *loaders, torch.device("cpu"), val.captions_per_image)["rsum"]


def test_fit_learns_and_resumes_from_the_saved_epoch(smoke_study, tmp_path):
    job = smoke_study("train.epochs=1").job()
    first = fit(job, LocalReporter(tmp_path / "run"))
    assert len(first) == 1 and first[0]["epoch"] == 1
    # A second process on the same directory with more epochs continues at epoch 2, not from scratch.
    resumed = LocalReporter(tmp_path / "run")
    history = fit(smoke_study("train.epochs=3").job(), resumed)
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert [m["epoch"] for m in resumed.history] == [2, 3]  # only the new epochs were trained
    assert history[0] == first[0]
    assert history[-1]["rsum"] > untrained_rsum(job) + 30
    assert "test_rsum" in history[-1] and "gap_centroid_dist" in history[-1]


def test_non_finite_loss_stops_the_run_with_a_clear_error(smoke_study, tmp_path):
    from trainables.errors import NonFiniteLossError

    job = smoke_study("train.lr=1.0e+12", "train.loss=triplet", "train.grad_clip=1.0e+12").job()
    with pytest.raises(NonFiniteLossError, match="non-finite loss at epoch"):
        fit(job, LocalReporter(tmp_path / "nan"))


@pytest.mark.slow
def test_ray_train_two_workers_improve_rsum_and_resume(smoke_study, ray_session, tmp_path):
    from study.train import resources_of
    from trainables.ray_train import train_job

    study = smoke_study("resources.workers_per_trial=2", "train.epochs=1")
    job = study.job()
    first = train_job(job, resources_of(study), name="ddp", storage_path=str(tmp_path / "ray"))
    assert len(first) == 1
    # Same run name, more epochs: Ray Train hands the latest checkpoint back and training continues.
    job2 = smoke_study("resources.workers_per_trial=2", "train.epochs=2").job()
    history = train_job(job2, resources_of(study), name="ddp", storage_path=str(tmp_path / "ray"))
    assert [m["epoch"] for m in history] == [1, 2]
    assert history[0]["rsum"] == first[0]["rsum"]
    assert history[-1]["rsum"] > untrained_rsum(job) + 30


def test_every_process_restores_from_its_own_copy_of_the_checkpoint(tmp_path):
    # Ray's default to_directory() folder is shared by every rank on a node, and a late rank
    # re-downloads into it while an early one reads it: a two-worker resume once read a torn state.pt.
    import ray.train
    from trainables.ray_train import private_copy

    (tmp_path / "state.pt").write_bytes(b"weights")
    checkpoint = ray.train.Checkpoint.from_directory(str(tmp_path))
    with private_copy(checkpoint) as first, private_copy(checkpoint) as second:
        assert first != second and str(tmp_path) not in (first, second)
        assert (Path(first) / "state.pt").read_bytes() == (Path(second) / "state.pt").read_bytes() == b"weights"
    assert not Path(first).exists() and not Path(second).exists()
    with private_copy(None) as nothing:
        assert nothing is None


@pytest.mark.parametrize("protocol", ["full", "coco_5fold"])
def test_the_test_split_protocol_comes_from_the_config(tmp_path, protocol):
    """2,000 test images: whether the 1K folds are reported is data.eval_protocol's decision alone
    (the image count once decided it, and 2,000 images fell below its 5,000-image guess)."""
    n, k = 2000, 5
    np.save(tmp_path / "test_ims.npy", np.random.default_rng(0).standard_normal((n, 2, 6)).astype(np.float32))
    (tmp_path / "test_caps.txt").write_text("".join(f"c {j}\n" for j in range(k * n)))
    job = JobConfig(data=DataConfig(root=str(tmp_path), eval_protocol=protocol),
                    model=ModelConfig(text_encoder="tiny", embed_dim=16))
    split = PrecompSplit(tmp_path, "test")
    model = build_model(job, split.feature_dim)
    metrics = evaluate_test(model, job, split, load_tokenizer("tiny"), torch.device("cpu"))
    assert "test_rsum" in metrics
    assert ("test_1k_rsum" in metrics) == (protocol == "coco_5fold")


def test_coco_5fold_on_a_test_split_of_partial_folds_fails_before_training(smoke_study, tmp_path):
    job = smoke_study("data.eval_protocol=coco_5fold").job()  # the smoke test split has 200 images
    reporter = LocalReporter(tmp_path / "run")
    with pytest.raises(ConfigError, match="coco_5fold needs whole folds of 1000 images.*has 200"):
        fit(job, reporter)
    assert reporter.history == []


def test_measuring_the_budget_changes_no_state(smoke_study):
    """Parameters, buffers (CDDS's running quantiles) and the RNG are as before the measurement."""
    from tests.test_methods import IMAGE_DIM, job_for, random_batch
    from trainables.loop import measure_budget

    job = job_for("cdds")
    torch.manual_seed(0)
    model = build_model(job, IMAGE_DIM).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    budget = measure_budget(model, random_batch(), job, 1, torch.device("cpu"))
    assert set(budget) >= {"budget/s", "budget/m", "weighted/s"} and abs(sum(
        v for k, v in budget.items() if k.startswith("budget/")) - 1) < 1e-6
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(b.numel() for b in model.buffers())  # CDDS has running buffers: the check is not vacuous


# --- host syncs: on the GPU each read of a device tensor on the host stalls the step --------------

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy", "nonzero")


def count_host_reads(monkeypatch) -> Counter[str]:
    """Count, by name and calling file, every host read of a tensor made by code in ``trainables/``
    (on CUDA each is a sync): ``.item()``, ``float()``, ``if tensor``, ``.tolist()``, ``.cpu()``,
    ``nonzero`` and boolean-mask indexing (a data-dependent shape). On the CPU
    ``torch.cuda.set_sync_debug_mode`` sees nothing, so the calls themselves are counted."""
    import sys

    import trainables

    root, counts = str(Path(trainables.__file__).parent), Counter()

    def spy(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(root) and (name != "__getitem__" or _bool_index(args[0])):
                counts[f"{name} in {Path(caller).name}"] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for name in (*HOST_READS, "__getitem__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    return counts


def _bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


def epoch_of(method: str, batches: list[dict], **train) -> dict[str, float]:
    from tests.test_methods import IMAGE_DIM, job_for
    from trainables.loop import TrainStep, train_one_epoch

    job = job_for(method, **train)
    job = job.model_copy(update={"data": job.data.model_copy(update={"region_dropout": 0.0})})
    torch.manual_seed(0)
    model = build_model(job, IMAGE_DIM)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return train_one_epoch(TrainStep(model), model, batches, optimizer, job, 1, torch.device("cpu"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_training_step_reads_nothing_on_the_host(method, monkeypatch):
    """The host reads of an epoch do not grow with its steps: none per step, only the per-epoch
    budget and the one read of the summed stats (``trainables/step_stats.py``)."""
    from tests.test_methods import random_batch

    monkeypatch.setattr("trainables.loop.LOG_EVERY", 1000)
    counts = count_host_reads(monkeypatch)
    short = epoch_of(method, [random_batch(seed) for seed in range(2)])
    per_epoch = dict(counts)
    counts.clear()
    long = epoch_of(method, [random_batch(seed) for seed in range(5)])
    assert short["steps"] == 2 and long["steps"] == 5
    assert per_epoch, "the spy saw nothing: it is not counting"
    assert dict(counts) == per_epoch


def test_stats_are_summed_on_the_device_and_averaged_per_epoch():
    from trainables.model import LossOutput
    from trainables.step_stats import StepStats

    stats = StepStats(epoch=0)
    for step in range(4):
        terms = {"align": torch.tensor(float(step)), "dim": torch.tensor(2.0 * step)}
        stats.add(terms["align"] + 0.5 * terms["dim"],
                  LossOutput(terms, {"dim": 0.5}, {"density": torch.tensor(step / 10), "legacy": 1.0}))
    means = stats.means()
    assert means == pytest.approx({"loss": 3.0, "loss_align": 1.5, "loss_dim": 3.0, "density": 0.15,
                                   "legacy": 1.0})


@pytest.mark.parametrize("log_every,checked", [(1000, "steps 1-5"), (2, "steps 3-4")])
def test_a_non_finite_loss_is_named_at_the_next_read(log_every, checked, monkeypatch):
    """The flag stays on the device until the next read (every LOG_EVERY steps, and at the end of the
    epoch); the error names the epoch, the first bad step, the steps that read covered and the terms."""
    from tests.test_methods import random_batch
    from trainables.errors import NonFiniteLossError

    monkeypatch.setattr("trainables.loop.LOG_EVERY", log_every)
    batches = [random_batch(seed) for seed in range(5)]
    batches[2]["images"] = torch.full_like(batches[2]["images"], float("nan"))
    expected = rf"non-finite loss at epoch 2 step 3 \(align=nan; found when checking {checked};"
    with pytest.raises(NonFiniteLossError, match=expected):
        epoch_of("base", batches)
