"""Tuner assembly: the second (and last) file that calls Ray's APIs, with ``trainables/ray_train.py``.

One trial = one training run of the study's method with the sampled parameters. With one worker
per trial the epoch loop runs directly in the trial (no Train start-up); with more, the trial
builds a ``TorchTrainer`` named by the trial id and forwards its reports with Ray's
``TuneReportCallback``.
"""

from __future__ import annotations

from typing import Any

import optuna
import ray.tune
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from study.spaces import Param, define_by_run, grid
from trainables.config import JobConfig
from trainables.loop import fit
from trainables.ray_train import TuneReporter, WorkerResources, make_trainer, quiet_ray_logs

OPTUNA_JOURNAL = "optuna.journal"


def apply_to_job(job: dict, params: dict[str, Any]) -> JobConfig:
    """The base job (plain dict) with the trial's ``{"section.key": value}`` applied."""
    job = {**job, "data": dict(job["data"]), "model": dict(job["model"]), "train": dict(job["train"]),
           "method_params": dict(job["method_params"])}
    for name, value in params.items():
        section, _, key = name.partition(".")
        target = job["method_params"] if section not in ("data", "model", "train") else job[section]
        target[key] = value
    return JobConfig(**job)


def run_trial(config: dict, base_job: dict, resources: WorkerResources, storage_path: str) -> None:
    """The Tune function trainable: ``config`` holds the sampled ``section.key`` values."""
    quiet_ray_logs()  # one line per checkpoint is noise in the study's console
    job = apply_to_job(base_job, config)
    if resources.num_workers == 1:
        fit(job, TuneReporter())
        return
    context = ray.tune.get_context()
    trainer = make_trainer(job, resources, name=f"train-{context.get_trial_id()}",
                           storage_path=storage_path, callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error is not None:
        raise result.error


def with_trial_resources(study, fn, **parameters):
    """``fn`` as a Tune trainable holding the study's resources (``parameters`` go to every trial)."""
    r = study.resources
    resources = WorkerResources(r.workers_per_trial, r.cpus_per_worker, r.gpus)
    fn = ray.tune.with_parameters(fn, resources=resources, storage_path=study.storage.path, **parameters)
    if resources.num_workers == 1:
        request = {"CPU": r.cpus_per_worker, "GPU": r.gpus}
    else:
        # The trial only drives; its Train workers request their own CPUs/GPUs. Ray refuses an empty
        # request, so the driver asks for a sliver of memory instead of a CPU a worker needs.
        request = {"CPU": 0, "memory": 64 * 2**20}
    return ray.tune.with_resources(fn, request)


def trainable(study, base_job: dict):
    return with_trial_resources(study, run_trial, base_job=base_job)


def searcher(study, params: dict[str, Param], journal_path: str):
    """Optuna (TPE or random) over a define-by-run space, persisted in a journal file so
    ``optuna.load_study`` / optuna-dashboard can open it and a resumed study keeps its history."""
    s = study.search
    if s.algorithm == "grid":
        return None
    if s.algorithm == "optuna-tpe":
        startup = {} if s.startup_trials is None else {"n_startup_trials": s.startup_trials}
        sampler = optuna.samplers.TPESampler(seed=s.seed, **startup)
    else:
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    storage = JournalStorage(JournalFileBackend(journal_path))
    return OptunaSearch(space=define_by_run(params), metric=s.metric, mode=s.mode, sampler=sampler,
                        study_name=study.name, storage=storage)


def scheduler(study):
    s = study.search
    if s.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=study.train.epochs,
                         grace_period=min(s.grace_period, study.train.epochs),
                         reduction_factor=s.reduction_factor)


def build_tuner(study, params: dict[str, Param], base_job: dict, journal_path: str, callbacks: list,
                progress) -> ray.tune.Tuner:
    s = study.search
    search_alg = searcher(study, params, journal_path)
    param_space = {name: ray.tune.grid_search(values) for name, values in grid(params).items()} \
        if search_alg is None else None
    return ray.tune.Tuner(
        trainable(study, base_job),
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=s.metric, mode=s.mode, search_alg=search_alg, scheduler=scheduler(study),
            num_samples=1 if search_alg is None else s.num_samples,
            max_concurrent_trials=study.resources.max_concurrent_trials,
            trial_name_creator=lambda trial: f"trial_{trial.trial_id}",
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
        ),
        run_config=ray.tune.RunConfig(
            name=study.name, storage_path=study.storage.path, callbacks=callbacks,
            failure_config=ray.tune.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=1),
            progress_reporter=progress, verbose=1,
        ),
    )


def restore_tuner(study_dir: str, study, base_job: dict) -> ray.tune.Tuner:
    return ray.tune.Tuner.restore(study_dir, trainable=trainable(study, base_job),
                                  resume_unfinished=True, resume_errored=False)


# --------------------------------------------------------------------------------------------------
# Ablation grid (``study ablate``): rows × seeds, FIFO, no search algorithm, no early stopping
# --------------------------------------------------------------------------------------------------


def run_ablation_trial(config: dict, jobs: dict[str, dict], resources: WorkerResources, storage_path: str) -> None:
    """One ablation cell: row ``config["variant"]``'s job (rows may switch method) with its seed."""
    run_trial({"train.seed": config["seed"]}, jobs[config["variant"]], resources, storage_path)


def ablation_trainable(study, jobs: dict[str, dict]):
    return with_trial_resources(study, run_ablation_trial, jobs=jobs)


def build_ablation_tuner(study, name: str, jobs: dict[str, dict], seeds: list[int], callbacks: list) -> ray.tune.Tuner:
    """One Tune grid over ``variant`` × ``seed``; every trial runs all epochs (FIFO)."""
    progress = ray.tune.CLIReporter(
        metric_columns={"training_iteration": "epoch", "loss": "loss", "rsum": "rsum"},
        parameter_columns={"variant": "variant", "seed": "seed"}, max_report_frequency=30)
    return ray.tune.Tuner(
        ablation_trainable(study, jobs),
        param_space={"variant": ray.tune.grid_search(list(jobs)), "seed": ray.tune.grid_search(list(seeds))},
        tune_config=ray.tune.TuneConfig(
            metric="rsum", mode="max", scheduler=FIFOScheduler(), num_samples=1,
            max_concurrent_trials=study.resources.max_concurrent_trials,
            trial_name_creator=lambda trial: f"trial_{trial.trial_id}",
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
        ),
        run_config=ray.tune.RunConfig(
            name=name, storage_path=study.storage.path, callbacks=callbacks,
            failure_config=ray.tune.FailureConfig(max_failures=study.search.max_failures),
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=1),
            progress_reporter=progress, verbose=1,
        ),
    )


def restore_ablation_tuner(ablation_dir: str, study, jobs: dict[str, dict]) -> ray.tune.Tuner:
    return ray.tune.Tuner.restore(ablation_dir, trainable=ablation_trainable(study, jobs),
                                  resume_unfinished=True, resume_errored=False)
