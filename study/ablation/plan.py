"""The ablation plan (SPEC.md "Ablation tables"): which rows × seeds, at which fixed hyperparameters.

Everything here is validated before Ray starts: the rows (the method's registered ``Ablation`` rows,
or the study file's ``ablation.variants`` subset of them), the seeds, every row's job config, and,
with ``--from-study``, the best trial of an earlier study whose searched values become the fixed
hyperparameters of every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from study.config import apply_params
from study.layout import RESULTS_FILE, load_study_dir
from study.results import best_trial
from trainables.errors import ConfigError
from trainables.methods import Ablation, get_method


@dataclass(frozen=True)
class AblationPlan:
    study: object  # the StudyConfig with the fixed hyperparameters applied
    rows: tuple[Ablation, ...]  # registry order: full first, base last
    seeds: tuple[int, ...]
    jobs: dict[str, dict] = field(default_factory=dict)  # row name -> JobConfig as plain data
    source: dict = field(default_factory=dict)  # --from-study: dir, trial id, applied values

    @property
    def name(self) -> str:
        return f"{self.study.name}-ablation"


def select_rows(method: str, variants: list[str] | None) -> tuple[Ablation, ...]:
    """The method's ablation rows, or the named subset of them, always in registry order."""
    rows = get_method(method).ablations
    if variants is None:
        return rows
    valid = ", ".join(repr(r.name) for r in rows)
    if not variants:
        raise ConfigError(f"ablation.variants is empty: list some of {valid}, or null for all of them")
    duplicates = sorted({v for v in variants if variants.count(v) > 1})
    if duplicates:
        raise ConfigError(f"ablation.variants names {', '.join(map(repr, duplicates))} more than once")
    unknown = [v for v in variants if v not in {r.name for r in rows}]
    if unknown:
        raise ConfigError(f"ablation.variants: unknown row {unknown[0]!r} for method {method!r}; valid: {valid}")
    return tuple(r for r in rows if r.name in variants)


def seeds_override(text: str | None) -> list[str]:
    """``--seeds 0,1,2`` as the ``--set ablation.seeds=[0, 1, 2]`` it stands for."""
    if text is None:
        return []
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1,2") from None
    return [f"ablation.seeds={seeds}"]


def check_seeds(seeds: list[int]) -> tuple[int, ...]:
    duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
    if duplicates:
        raise ConfigError(f"ablation.seeds repeats {', '.join(map(str, duplicates))}: each seed once")
    return tuple(seeds)


def row_study(study, row: Ablation):
    """The study as ``row`` runs it: its method (the base row switches method) with its overrides."""
    values = {"method": row.method, **{f"{row.method}.{key}": value for key, value in row.overrides.items()}}
    return apply_params(study, values, f"ablation row {row.name!r}")


def find_study_dir(ref: str, storage_path: str) -> Path:
    """``--from-study``: a study directory, or a study name under the file's ``storage.path``."""
    for candidate in (Path(ref).expanduser(), Path(storage_path) / ref):
        if (candidate / RESULTS_FILE).is_file():
            return candidate.resolve()
    raise ConfigError(f"--from-study {ref!r}: no finished study (with {RESULTS_FILE}) at {ref} or "
                      f"{Path(storage_path) / ref}; run it first with `python -m study run STUDY.yaml`")


def best_trial_values(study_dir: Path, method: str) -> tuple[dict, dict]:
    """The best trial's searched values (by that study's metric and mode) and where they came from."""
    source, params, study_dir, _ = load_study_dir(study_dir)
    if source.method != method:
        raise ConfigError(f"--from-study {study_dir}: that study searched method {source.method!r}, "
                          f"this ablation is of {method!r}")
    table = pd.read_csv(study_dir / RESULTS_FILE, dtype={"trial_id": str})  # hex ids like "1e50a3b2" are not numbers
    metric = source.search.metric
    best = best_trial(table, metric, source.search.mode)
    if best is None:
        raise ConfigError(f"--from-study {study_dir}: no trial finished with {metric!r}; nothing to take")
    values = {}
    for name, param in params.items():
        if name in best and pd.notna(best[name]):  # NaN: a conditional parameter the trial did not use
            value = best[name].item() if hasattr(best[name], "item") else best[name]  # numpy scalar
            values[name] = int(value) if param.type == "int" else value
    info = {"from_study": str(study_dir), "trial_id": str(best["trial_id"]), metric: float(best[metric])}
    return values, info


def plan_ablation(study, from_study: str | None = None) -> AblationPlan:
    """Rows, seeds and one validated job per row; raises a one-line ConfigError on any problem."""
    rows = select_rows(study.method, study.ablation.variants)
    seeds = check_seeds(list(study.ablation.seeds))
    source = {}
    if from_study is not None:
        values, source = best_trial_values(find_study_dir(from_study, study.storage.path), study.method)
        study = apply_params(study, values)
        source["values"] = values
    jobs = {row.name: row_study(study, row).job().model_dump(mode="json") for row in rows}
    return AblationPlan(study, rows, seeds, jobs, source)
