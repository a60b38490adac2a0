"""All of Ray Tune: the trial function, the Tuners of a search and of an ablation, the console
reporter, the MLflow callback adapter, and the result grid turned into plain ``TrialRecord``s.

With ``trainables/ray_train.py`` and ``study/ray_session.py``, one of the three files that import
Ray (``tests/test_layering.py`` keeps it so). One trial = one training run of the study's method with
the sampled parameters. With one worker per trial the epoch loop runs directly in the trial (no
Train start-up); with more, the trial builds a ``TorchTrainer`` named by the trial id and forwards its
reports with Ray's ``TuneReportCallback``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path

import optuna
import ray.tune
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from study.config import job_with_params
from trainables.progress import Progress
from study.results import SCHEDULES_FILE, TrialRecord
from study.spaces import ClipToSpace, DefineByRun, Param, grid
from study.tracking import TrialRuns, short
from trainables.ray_train import WorkerResources, build_trainer, fit_in_trial, last_line, quiet_ray_logs

LIVE_STATES = ("PENDING", "RUNNING", "PAUSED")  # Tune's trial states of a trial it has not ended


def quiet_tune_console() -> None:
    """Tune's console as the study commands want it; call before building a Tuner."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic console, silent at verbose=0: our lines only
    # Every epoch checkpoints by design (resume from the last epoch); Tune's advice against it is noise here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in Journal ..." per search
    # PBT restarts a function trainable per exploit; Tune's advice (reuse_actors + reset_config) is for
    # class trainables.
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance")


class TrackingCallback(ray.tune.Callback):
    """Tune's callback events forwarded to ``TrialRuns`` (MLflow child runs); its state (the trial ->
    run map) is saved in Tune's experiment state, so a resumed study reuses its runs. MLflow is a
    side service: ``TrialRuns`` keeps its events in the study folder (Tune's experiment directory)
    while MLflow is unreachable, and nothing of it may raise into Tune (``guarded``)."""

    def __init__(self, runs: TrialRuns):
        self.runs = runs

    def get_state(self) -> dict:
        return self.runs.get_state()

    def set_state(self, state: dict) -> None:
        self.runs.set_state(state)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.guarded(self.runs.attach, trial.remote_experiment_path)
        self.guarded(self.runs.started, trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.guarded(self.runs.reported, trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.guarded(self.runs.completed, trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.guarded(self.runs.failed, trial.trial_id, error_file_line(getattr(trial, "error_file", None)))

    def on_experiment_end(self, trials, **info):
        line = self.guarded(self.runs.close)
        if line:
            print(line, file=sys.stderr, flush=True)

    @staticmethod
    def guarded(fn, *args):
        """``fn(*args)``; an error is one warning line, never an exception in Tune's loop."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001
            print(f"warning: MLflow tracking: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            return None


class ProgressCallback(ray.tune.Callback):
    """Tune's callback events as our console lines (``study/progress.py``), on the driver."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def on_trial_start(self, iteration, trials, trial, **info):
        self.progress.started(trial.trial_id, trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.progress.reported(trial.trial_id, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.progress.completed(trial.trial_id, int((trial.last_result or {}).get("training_iteration", 0)))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.progress.failed(trial.trial_id, error_file_line(getattr(trial, "error_file", None)))


class ScheduleCallback(ray.tune.Callback):
    """PBT: each reported epoch's values of the mutated keys, appended to ``schedules.jsonl`` in the
    study directory by the driver. Tune's own per-trial ``result.json`` is no record of them: when a
    trial restarts (every PBT exploit does), Tune copies the trial folder's stored ``result.json``
    over the driver's newer copy (``JsonLoggerCallback`` → ``_restore_from_remote``), and the epochs
    not yet synced are lost (measured: a 2-epoch trial kept only its second line)."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.names = path, names

    def on_trial_result(self, iteration, trials, trial, result, **info):
        config = result.get("config") or trial.config
        line = {"trial_id": trial.trial_id, "training_iteration": int(result.get("training_iteration", 0)),
                "epoch": result.get("epoch"), **{name: config.get(name) for name in self.names}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(line) + "\n")


def search_progress(study, params: dict[str, Param], runs: TrialRuns) -> Progress:
    """Search trials are named as their MLflow runs (``<method>-NNN``); the start line shows the values.
    Each epoch's line shows rSum and the first other objective."""
    total = math.prod(len(values) for values in grid(params).values()) if study.search.algorithm == "grid" \
        else study.search.num_samples
    shown = next((name for name, _ in study.search.objectives if name != "rsum"), "rsum")
    return Progress(lambda config, number: f"{runs.method}-{number:03d}", total, study.train.epochs,
                    metric=shown,
                    detail=lambda config: " ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in config.items()))


def error_file_line(path: str | None) -> str:
    """The last non-empty line of a trial's error file (Ray prints the exception last)."""
    try:
        with open(path) as handle:
            lines = [line.strip() for line in handle.read().splitlines() if line.strip()]
    except (OSError, TypeError):
        lines = []
    return (lines[-1] if lines else "unknown error")[:500]


def trial_records(grid) -> list[TrialRecord]:
    """Tune's result grid as plain records: id, config, last metrics, error line, still live?"""
    # ResultGrid exposes no public per-trial state; its analysis object is the only place Tune keeps it.
    analysis = getattr(grid, "_experiment_analysis", None)
    states = {trial.trial_id: trial.status for trial in getattr(analysis, "trials", [])}
    records = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or (result.path or "").rstrip("/").rsplit("trial_", 1)[-1]
        state = states.get(trial_id)
        records.append(TrialRecord(
            trial_id=trial_id, config=dict(result.config or {}), metrics=metrics,
            error=last_line(result.error) if result.error is not None else "",
            live=None if state is None else state in LIVE_STATES))
    return records


def run_trial(config: dict, base_job: dict, resources: WorkerResources, storage_path: str) -> None:
    """The Tune function trainable: ``config`` holds the sampled ``section.key`` values."""
    quiet_ray_logs()  # one line per checkpoint is noise in the study's console
    job = job_with_params(base_job, {name: value for name, value in config.items() if "." in name})
    if resources.num_workers == 1:
        fit_in_trial(job, resources.gpus_per_worker)
        return
    context = ray.tune.get_context()
    trainer = build_trainer(job, resources, name=f"train-{context.get_trial_id()}",
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


def sampler(study):
    """Optuna's sampler for the study. TPE serves one objective and several (Optuna's MOTPE, the
    same class since Optuna 4): NSGA-II, Optuna's default for several objectives, samples its first
    generation (50 trials) at random and cannot handle conditional (define-by-run) spaces, so a
    16–32-trial study with ``when`` conditions would never leave random search."""
    s = study.search
    if s.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    startup = {} if s.startup_trials is None else {"n_startup_trials": s.startup_trials}
    return optuna.samplers.TPESampler(seed=s.seed, **startup)


def searcher(study, params: dict[str, Param], journal_path: str, points: list[tuple[str, dict]] = ()):
    """Optuna (TPE or random; one objective or several) over a define-by-run space, persisted in a
    journal file so ``optuna.load_study`` / optuna-dashboard can open it and a resumed study keeps its
    history. ``points`` (warm start) are enqueued as the first trials through ``points_to_evaluate``,
    once: a journal that already exists (a resume) has them. A grid or PBT has no searcher here."""
    s = study.search
    if s.algorithm in ("grid", "pbt"):
        return None
    enqueue = [values for _, values in points] if not os.path.exists(journal_path) else None
    names, modes = zip(*s.objectives)
    metric, mode = (list(names), list(modes)) if s.multi_objective else (s.metric, s.mode)
    storage = JournalStorage(JournalFileBackend(journal_path))
    return OptunaSearch(space=DefineByRun(params, points), metric=metric, mode=mode, sampler=sampler(study),
                        study_name=study.name, storage=storage, points_to_evaluate=enqueue)


def tune_domain(param: Param):
    """A space parameter as Tune's own sampling domain (PBT's first values and its resampling)."""
    if param.type == "categorical":
        return ray.tune.choice(list(param.choices))
    if param.type == "int":
        sample = ray.tune.lograndint if param.log else ray.tune.randint
        return sample(int(param.low), int(param.high) + 1)  # Tune's upper bound is exclusive
    sample = ray.tune.loguniform if param.type == "loguniform" else ray.tune.uniform
    return sample(param.low, param.high)


class LastEpochKeptPBT(PopulationBasedTraining):
    """PBT that leaves a trial's last epoch alone. Ray's PBT would exploit there too: the trial
    restarts from the donor's last checkpoint with new values, trains no further epoch, and ends
    with values beside metrics they never produced (and a restart's seconds spent for nothing)."""

    def __init__(self, epochs: int, **options):
        super().__init__(**options)
        self.epochs = epochs

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("training_iteration", 0) >= self.epochs:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def pbt_scheduler(study, params: dict[str, Param]) -> PopulationBasedTraining:
    """PBT over the space (loss weights, ``study/spaces.py`` ``check_pbt_space``): every
    ``perturbation_interval`` epochs a trial in the bottom ``quantile_fraction`` restarts from a top
    trial's latest epoch checkpoint with its values resampled from the space (``resample_probability``)
    or multiplied by 1.2 / 0.8, then clipped into the space. Ranked by the study's metric."""
    p = study.search.pbt
    return LastEpochKeptPBT(
        study.train.epochs, time_attr="training_iteration", perturbation_interval=p.perturbation_interval, burn_in_period=p.burn_in,
        hyperparam_mutations={name: tune_domain(param) for name, param in params.items()},
        quantile_fraction=p.quantile_fraction, resample_probability=p.resample_probability,
        custom_explore_fn=ClipToSpace(params), synch=p.synch)


def scheduler(study, params: dict[str, Param]):
    """ASHA or FIFO; PBT for ``algorithm: pbt``. With several objectives ASHA ranks on the first one
    (it compares one number per rung); the default there is FIFO (``SearchConfig``)."""
    s = study.search
    if s.algorithm == "pbt":
        return pbt_scheduler(study, params)
    if s.scheduler == "fifo":
        return FIFOScheduler()
    ranked = {"metric": s.primary, "mode": s.primary_mode} if s.multi_objective else {}
    return ASHAScheduler(time_attr="training_iteration", max_t=study.train.epochs,
                         grace_period=min(s.grace_period, study.train.epochs),
                         reduction_factor=s.reduction_factor, **ranked)


def param_space(study, params: dict[str, Param]) -> dict | None:
    """Tune's own space where no Optuna searcher samples: a grid's points, PBT's first values."""
    if study.search.algorithm == "grid":
        return {name: ray.tune.grid_search(values) for name, values in grid(params).items()}
    if study.search.algorithm == "pbt":
        return {name: tune_domain(param) for name, param in params.items()}
    return None


def build_tuner(study, params: dict[str, Param], journal_path: str, runs: TrialRuns,
                points: list[tuple[str, dict]] = ()) -> ray.tune.Tuner:
    """The search study's Tuner: Optuna (or a grid, or PBT) and ASHA (or FIFO), trials tracked by
    ``runs``; ``points``: the warm-start trials (``study/spaces.py`` ``warm_start_points``)."""
    quiet_tune_console()
    s = study.search
    search_alg = searcher(study, params, journal_path, points)
    if s.algorithm == "pbt":  # seeded first values (PBT's own perturbations use Python's global random)
        search_alg = BasicVariantGenerator(random_state=s.seed)
    # Several objectives: OptunaSearch holds the metric list; Tune's own metric stays unset.
    metric, mode = (None, None) if s.multi_objective else (s.metric, s.mode)
    callbacks = [TrackingCallback(runs), ProgressCallback(search_progress(study, params, runs))]
    if s.algorithm == "pbt":
        callbacks.append(ScheduleCallback(Path(study.storage.path) / study.name / SCHEDULES_FILE, list(params)))
    return ray.tune.Tuner(
        trainable(study, study.job().model_dump(mode="json")),
        param_space=param_space(study, params),
        tune_config=ray.tune.TuneConfig(
            metric=metric, mode=mode, search_alg=search_alg, scheduler=scheduler(study, params),
            num_samples=1 if s.algorithm == "grid" else s.num_samples,
            max_concurrent_trials=study.resources.max_concurrent_trials,
            trial_name_creator=lambda trial: f"trial_{trial.trial_id}",
            trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}",
        ),
        run_config=ray.tune.RunConfig(
            name=study.name, storage_path=study.storage.path, callbacks=callbacks,
            failure_config=ray.tune.FailureConfig(max_failures=s.max_failures),
            # PBT restarts a trial from another's checkpoint, maybe epochs later (a population larger
            # than the concurrency waits its turn): keep every epoch's, not just the newest.
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=None if s.algorithm == "pbt" else 1),
            verbose=0,  # our own lines instead of Tune's table (ProgressCallback)
        ),
    )


def restore_tuner(study_dir: str, study) -> ray.tune.Tuner:
    quiet_tune_console()
    return ray.tune.Tuner.restore(study_dir, trainable=trainable(study, study.job().model_dump(mode="json")),
                                  resume_unfinished=True, resume_errored=False)


# --------------------------------------------------------------------------------------------------
# Ablation grid (``study ablate``): rows × seeds, FIFO, no search algorithm, no early stopping
# --------------------------------------------------------------------------------------------------


def run_ablation_trial(config: dict, jobs: dict[str, dict], resources: WorkerResources, storage_path: str) -> None:
    """One ablation cell: row ``config["variant"]``'s job (rows may switch method) with its seed."""
    run_trial({"train.seed": config["seed"]}, jobs[config["variant"]], resources, storage_path)


def ablation_trainable(study, jobs: dict[str, dict]):
    return with_trial_resources(study, run_ablation_trial, jobs=jobs)


def build_ablation_tuner(study, name: str, jobs: dict[str, dict], seeds: list[int], runs: TrialRuns) -> ray.tune.Tuner:
    """One Tune grid over ``variant`` × ``seed``; every trial runs all epochs (FIFO)."""
    quiet_tune_console()
    progress = Progress(runs.run_name, len(jobs) * len(seeds), study.train.epochs)
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
            name=name, storage_path=study.storage.path, callbacks=[TrackingCallback(runs), ProgressCallback(progress)],
            failure_config=ray.tune.FailureConfig(max_failures=study.search.max_failures),
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=1),
            verbose=0,  # our own lines instead of Tune's table (ProgressCallback)
        ),
    )


def restore_ablation_tuner(ablation_dir: str, study, jobs: dict[str, dict]) -> ray.tune.Tuner:
    quiet_tune_console()
    return ray.tune.Tuner.restore(ablation_dir, trainable=ablation_trainable(study, jobs),
                                  resume_unfinished=True, resume_errored=False)
