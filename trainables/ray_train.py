"""The thin Ray shell around ``fit``: one of the two files (with ``study/tuner.py``) that call Ray.

- ``train_loop_per_worker`` runs ``fit`` in every Ray Train worker (DDP process group set up by
  ``TorchTrainer``: gloo on CPU, NCCL on CUDA);
- ``build_trainer`` builds the ``TorchTrainer`` for a job (used by ``study train`` and by a Tune trial
  with several workers);
- ``TuneReporter`` lets a Tune trial run ``fit`` directly (``fit_in_trial``: the one-worker path, no
  Train start-up);
- ``assigned_device``: the device Ray assigned this process (``trainables/device.py``), never simply a
  visible GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import ray.exceptions
import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer, get_device

from trainables.config import JobConfig
from trainables.device import cap_memory, resolve_device
from trainables.errors import ITMError
from trainables.loop import fit
from trainables.progress import Progress


@dataclass(frozen=True)
class WorkerResources:
    num_workers: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0


def quiet_ray_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO; the CLI prints its own summary."""
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Train V2's worker context names its logger by file path, outside the "ray.train" tree: it dumps
    # "Reporting training result N: TrainingReport(checkpoint=..., metrics={...})" once per epoch.
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def assigned_device(gpus_per_worker: float, train_worker: bool) -> torch.device:
    """This process's device as Ray assigned it (``trainables/device.py``): the CPU unless Ray gave it
    GPUs; in a Train worker Ray Train's own ``get_device()``, in a Tune trial the first GPU of
    ``ray.get_gpu_ids()``. A fractional worker is held to its share of the GPU's memory."""
    gpu_ids = ray.get_gpu_ids()
    device = resolve_device(gpu_ids, torch.cuda.is_available(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                            ray_device=get_device() if train_worker and gpu_ids else None)
    cap_memory(device, gpus_per_worker)
    return device


def node_id() -> str:
    """The Ray node this process runs on (recorded per trial: which node trained it)."""
    return ray.get_runtime_context().get_node_id()


@contextlib.contextmanager
def private_copy(checkpoint: ray.train.Checkpoint | None) -> Iterator[str | None]:
    """This process's own copy of ``checkpoint``, deleted after the block.

    ``Checkpoint.to_directory()`` without a path gives every process on a node one shared folder,
    and a rank that arrives after the first download has finished downloads into it again while
    the others read it: rank 1 of a two-worker resume once read a torn ``state.pt``.
    """
    if checkpoint is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="itm-restore-") as tmp:
        yield checkpoint.to_directory(tmp)


class RayTrainReporter:
    """``Reporter`` inside a Ray Train worker; with ``progress`` (a run's name) rank 0 prints one line
    per epoch (``study train``; inside a Tune trial the driver prints them instead)."""

    def __init__(self, progress: Progress | None = None):
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.progress = progress if self.rank == 0 else None
        if self.progress is not None:
            self.progress.started("run", {})

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report({**metrics, "node_id": node_id()}, checkpoint=checkpoint)
        if self.progress is not None:
            self.progress.reported("run", metrics)

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        return private_copy(ray.train.get_checkpoint())


class TuneReporter:
    """``Reporter`` for ``fit`` running directly in a Tune trial (one worker, no process group)."""

    rank = 0
    world_size = 1

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        checkpoint = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report({**metrics, "node_id": node_id()}, checkpoint=checkpoint)

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        return private_copy(ray.tune.get_checkpoint())


def train_loop_per_worker(config: dict) -> list[dict[str, float]]:
    """Runs in every worker; rank 0's return value (the metric history) becomes ``Result.return_value``."""
    quiet_ray_logs()
    job = JobConfig(**config["job"])
    name = config.get("progress")
    progress = Progress(lambda _config, _number: name, 1, job.train.epochs) if name else None
    device = assigned_device(config.get("gpus_per_worker", 0), train_worker=True)
    return fit(job, RayTrainReporter(progress), device=device)


def fit_in_trial(job: JobConfig, gpus_per_worker: float) -> list[dict[str, float]]:
    """``fit`` directly inside a one-worker Tune trial, on the device Ray assigned the trial."""
    return fit(job, TuneReporter(), device=assigned_device(gpus_per_worker, train_worker=False))


def build_trainer(job: JobConfig, resources: WorkerResources, name: str, storage_path: str,
                  max_failures: int = 0, callbacks: list | None = None, progress: bool = False) -> TorchTrainer:
    """A ``TorchTrainer`` for ``job``; re-running with the same ``name`` and ``storage_path``
    resumes from the run's latest checkpoint. ``progress``: rank 0 prints a line per epoch."""
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.model_dump(mode="json"), "progress": name if progress else None,
                           "gpus_per_worker": resources.gpus_per_worker},
        scaling_config=ray.train.ScalingConfig(num_workers=resources.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # the CLI prints its own summary
        ),
    )


def train_job(job: JobConfig, resources: WorkerResources, name: str, storage_path: str) -> list[dict[str, float]]:
    """Run ``job`` on Ray Train; returns ``fit``'s per-epoch history. A failure in a worker (Ray Train
    V2 raises it from ``fit()`` itself, or returns it on the result) becomes one ``ITMError`` line."""
    try:
        result = build_trainer(job, resources, name=name, storage_path=storage_path, progress=True).fit()
        error = result.error
    except ray.exceptions.RayError as err:  # e.g. WorkerGroupError, ActorDiedError
        error = err
    if error is not None:
        raise ITMError(f"training failed: {last_line(error)}") from None
    return list(result.return_value or [])


def last_line(error: BaseException) -> str:
    """The last non-empty line of an error: Ray prints the worker's own exception last."""
    lines = [line for line in (str(error).strip() or type(error).__name__).splitlines() if line.strip()]
    return lines[-1].strip()[:500]
