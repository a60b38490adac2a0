"""``study train``: one run of a study's method on Ray Train, recorded in MLflow."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from study.layout import check_storage
from study.preflight import check_study
from trainables.errors import ITMError


@dataclass
class TrainingResult:
    final: dict[str, float]
    run_dir: str
    run_name: str
    tracking_kept: str | None = None  # MLflow was away: where its events wait, and how to send them


def connect(address: str | None, resources) -> None:
    """Start or join Ray (imported only now: a bad study fails before Ray loads); check the workers fit."""
    from study import ray_session

    ray_session.connect(address, resources)


def resources_of(study):
    from trainables.ray_train import WorkerResources

    r = study.resources
    return WorkerResources(r.workers_per_trial, r.cpus_per_worker, r.gpus)


def run_name(study, resume: bool) -> str:
    """A fresh ``NAME-train-YYYYmmdd-HHMMSS``, or with ``resume`` the newest existing one (Ray Train
    continues a run of the same name from its latest checkpoint). A run that failed before its
    first checkpoint has nothing to continue from and is skipped."""
    if resume:
        previous = [run for run in sorted(Path(study.storage.path).glob(f"{study.name}-train-*"))
                    if any(run.glob("checkpoint_*"))]
        if not previous:
            raise ITMError(f"nothing to resume: no {study.name}-train-* run with a checkpoint in "
                           f"{study.storage.path}; start a fresh run without --resume")
        return previous[-1].name
    return f"{study.name}-train-{time.strftime('%Y%m%d-%H%M%S')}"


def run_training(study, address: str | None = None, resume: bool = False) -> TrainingResult:
    """Validate the data, train on Ray Train (or continue the newest run with ``resume``), log."""
    check_study(study)  # bad data, encoder, tracking URI or storage fails here, before any worker starts
    if "://" not in study.storage.path:  # Ray Train itself can write to s3:// and the like
        check_storage(study.storage.path)
    name = run_name(study, resume)
    connect(address, study.resources)
    from trainables.ray_train import train_job  # Ray loads only once the checks have passed

    history = train_job(study.job(), resources_of(study), name=name, storage_path=study.storage.path)
    run_dir = Path(study.storage.path) / name
    kept = log_run(study, name, history, run_dir if run_dir.is_dir() else None)
    return TrainingResult(history[-1] if history else {}, str(run_dir), name, kept)


def log_run(study, run_name: str, history: list[dict[str, float]], folder: Path | None = None) -> str | None:
    """One MLflow run with the study as params and every epoch's metrics. Written through an
    ``Outbox`` (``study/tracking_buffer.py``) whose buffer lives in the run's ``folder``: a tracking
    server that is away after a long training keeps the results for ``python -m study sync`` instead
    of losing them. Returns the line to print if events are still kept, else None."""
    from study import tracking
    from study.tracking_buffer import Outbox

    outbox = Outbox(study.tracking.uri, study.tracking.experiment, folder)
    run = outbox.create_run(run_name, tags={"study": study.name, "method": study.method, "kind": "train"})
    outbox.log(run, params=tracking.flatten(study.model_dump(mode="json")))
    for metrics in history:
        outbox.log(run, metrics={k: float(v) for k, v in metrics.items() if k != "epoch"},
                   step=int(metrics.get("epoch", 0)))
    outbox.set_status(run, "FINISHED")
    return outbox.close()
