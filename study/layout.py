"""What a study or ablation directory holds, and the only readers of its stored files (no Ray).

A study directory (``storage.path/NAME``) and an ablation directory (``storage.path/NAME-ablation``)
both hold Tune's experiment state, the resolved ``study.yaml``, ``mlflow_parent.json`` (the MLflow
parent run) and ``results.csv``; a study adds ``space.yaml`` and the Optuna journal, an ablation
``ablation.json`` and its tables.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

from pydantic import ValidationError

from study.config import read_yaml, validate
from study.spaces import Param, Space, first_problem
from trainables.errors import ConfigError

STUDY_FILE = "study.yaml"  # the resolved study file (absolute paths, ablation rows and seeds spelled out)
SPACE_FILE = "space.yaml"  # the resolved search space of a search study
PARENT_FILE = "mlflow_parent.json"  # {"run_id": ...} of the MLflow parent run
RESULTS_FILE = "results.csv"  # one row per trial (study/results.py)
OPTUNA_JOURNAL = "optuna.journal"  # openable with optuna.load_study / optuna-dashboard
TUNER_STATE = "tuner.pkl"  # written by Tune once the run has started: resume restores from it
REPORT_DIR = "report"

# Set by Ray for the entrypoint of a Ray Job (`ray job submit`): its runtime env and metadata.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_working_dir() -> Path | None:
    """The driver's working directory if it runs as a Ray Job with an uploaded ``working_dir``.

    That directory is an unpacked per-node copy under Ray's session dir, deleted with the session:
    nothing that must outlive the job or be seen by other nodes may be written below it.
    """
    config = os.environ.get(JOB_CONFIG_ENV)
    if not config:
        return None
    try:
        runtime_env = json.loads(config).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return Path.cwd().resolve() if runtime_env.get("working_dir") else None


def check_storage(path: str) -> None:
    """On a cluster every node writes checkpoints under ``storage.path`` and the driver writes its
    sidecar files (Optuna journal, results.csv) with plain file I/O, so the path must be a directory
    all nodes see: a local dir on one machine, an NFS/shared mount on a cluster."""
    if "://" in path:
        raise ConfigError(f"storage.path {path!r}: the study engine writes its Optuna journal and results.csv "
                          "beside Tune's state with plain file I/O, so it needs a directory (local on one machine, "
                          "an NFS mount shared by all nodes on a cluster), e.g. --set storage.path=/mnt/shared/results")
    job_dir = job_working_dir()
    if job_dir is not None and Path(path).is_relative_to(job_dir):
        raise ConfigError(f"storage.path {str(Path(path).relative_to(job_dir))!r} resolves inside the Ray job's "
                          f"working_dir copy ({job_dir}), which is per node and temporary: give an "
                          "absolute path all nodes share, e.g. --set storage.path=/mnt/shared/results")


def study_dir_of(study) -> Path:
    """``storage.path/NAME``, after checking that every node can reach it."""
    check_storage(study.storage.path)
    return Path(study.storage.path) / study.name


def ablation_dir_of(study) -> Path:
    """``storage.path/NAME-ablation``, after checking that every node can reach it."""
    check_storage(study.storage.path)
    return Path(study.storage.path) / f"{study.name}-ablation"


def move_aside(directory: Path) -> Path | None:
    """Rename ``directory`` to ``NAME.old-YYYYmmdd-HHMMSS`` beside it (``run --restart``), so a study
    whose space or settings were wrong starts over without deleting anything; None if absent."""
    if not directory.exists():
        return None
    stamp = f"{directory.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    names = (stamp if n == 0 else f"{stamp}-{n}" for n in itertools.count())  # two restarts in one second
    target = next(path for path in map(directory.with_name, names) if not path.exists())
    directory.rename(target)
    return target


def write_parent(directory: Path, run_id: str) -> None:
    (directory / PARENT_FILE).write_text(json.dumps({"run_id": run_id}))


def read_parent(directory: Path) -> str:
    """The MLflow parent run id recorded in a study or ablation directory."""
    path = Path(directory) / PARENT_FILE
    try:
        return json.loads(path.read_text())["run_id"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: not the {{\"run_id\": ...}} this engine writes; the study directory "
                          "is damaged") from None


def load_stored_study(directory: Path):
    """The resolved study file stored in a study or ablation directory, validated again."""
    path = Path(directory) / STUDY_FILE
    return validate(read_yaml(path, "stored study file"), str(path))


def load_study_dir(study_dir: str | Path) -> tuple[object, dict[str, Param], Path, str]:
    """A search study's stored file, space and parent run: ``(study, params, study_dir, parent)``."""
    study_dir = Path(study_dir).expanduser().resolve()
    if study_dir.is_file():
        raise ConfigError(f"{study_dir} is a file; resume takes a study directory (storage.path/NAME)")
    for name in (STUDY_FILE, SPACE_FILE, PARENT_FILE):
        if not (study_dir / name).is_file():
            raise ConfigError(f"{study_dir} is not a study directory (no {name}); pass storage.path/NAME of a study")
    study = load_stored_study(study_dir)
    space = study_dir / SPACE_FILE
    try:
        params = dict(Space(**read_yaml(space, "stored search space")).params)
    except ValidationError as err:
        raise ConfigError(f"{space}: {first_problem(err)}") from None
    return study, params, study_dir, read_parent(study_dir)
