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
    log_run(study, name, history)
    return TrainingResult(history[-1] if history else {}, str(Path(study.storage.path) / name), name)


def log_run(study, run_name: str, history: list[dict[str, float]]) -> str:
    from study import tracking

    client, experiment_id = tracking.client_for(study.tracking.uri, study.tracking.experiment)
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={"study": study.name, "method": study.method, "kind": "train"})
    tracking.log_params(client, run.info.run_id, tracking.flatten(study.model_dump(mode="json")))
    for metrics in history:
        tracking.log_epoch(client, run.info.run_id, metrics, step=int(metrics.get("epoch", 0)))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
