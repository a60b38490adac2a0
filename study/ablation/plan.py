"""The ablation plan (SPEC.md "Ablation tables"): which rows × seeds, at which fixed hyperparameters.

Everything here is validated before Ray starts: the rows (the method's registered ``Ablation`` rows,
or the study file's ``ablation.variants`` subset of them), the seeds, every row's job config, and,
with ``--from-study``, the best trial of an earlier study whose searched values become the fixed
hyperparameters of every row; with ``--tune-rows N``, each row's own search study (the study's
space less what the row switches off), whose best trial later fixes that row's values alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from study.config import JOB_SECTIONS, apply_params
from study.layout import RESULTS_FILE, ablation_dir_of, load_study_dir
from study.results import pick_trial
from study.spaces import SHARED_SECTIONS, Param, is_active, ordered, resolve_space
from trainables.errors import ConfigError
from trainables.methods import Ablation, get_method

TUNE_DIR = "tune"  # --tune-rows: one search study per row in ABLATION_DIR/tune/<row slug>/


@dataclass(frozen=True)
class AblationPlan:
    study: object  # the StudyConfig with the fixed hyperparameters applied
    rows: tuple[Ablation, ...]  # registry order: full first, base last
    seeds: tuple[int, ...]
    jobs: dict[str, dict] = field(default_factory=dict)  # row name -> JobConfig as plain data
    # --from-study: {from_study, trial_id, values, metric}; --tune-rows: {tune_rows, metric, mode,
    # rows: {row: {params, trial_id, values, metric}}} (rows filled in as their searches finish)
    source: dict = field(default_factory=dict)
    searches: dict = field(default_factory=dict)  # --tune-rows: row -> its search study (rows with a space)

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


def searched_values(best: dict, params: dict[str, Param]) -> dict:
    """A best trial's searched values as plain Python (ints stay ints); conditional parameters the
    trial did not use are left out."""
    values = {}
    for name, param in params.items():
        if name in best and pd.notna(best[name]):  # NaN: a conditional parameter the trial did not use
            value = best[name].item() if hasattr(best[name], "item") else best[name]  # numpy scalar
            values[name] = int(value) if param.type == "int" else value
    return values


def best_trial_values(study_dir: Path, method: str, pick: str | None = None) -> tuple[dict, dict]:
    """The searched values of the trial ``pick`` names (``study/results.py`` ``pick_trial``; default:
    the best by the study's metric, or by its first objective within its Pareto set) and where they
    came from."""
    source, params, study_dir, _ = load_study_dir(study_dir)
    if source.method != method:
        raise ConfigError(f"--from-study {study_dir}: that study searched method {source.method!r}, "
                          f"this ablation is of {method!r}")
    table = pd.read_csv(study_dir / RESULTS_FILE, dtype={"trial_id": str})  # hex ids like "1e50a3b2" are not numbers
    try:
        chosen, how = pick_trial(table, source.search.objectives, pick)
    except ConfigError as err:
        raise ConfigError(f"--from-study {study_dir}: {err}") from None
    values = searched_values(chosen, params)
    info = {"from_study": str(study_dir), "trial_id": str(chosen["trial_id"]), "pick": how}
    info.update({name: float(chosen[name]) for name, _ in source.search.objectives if pd.notna(chosen.get(name))})
    return values, info


# --------------------------------------------------------------------------------------------------
# --tune-rows N: every row (base included) gets its own N-trial search over what it does not switch off
# --------------------------------------------------------------------------------------------------


def row_slug(name: str) -> str:
    """A row name as a folder and search-study name: ``w/o L_dim`` -> ``w-o-L_dim``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "row"


def fixed_value(study, name: str):
    """The value ``section.key`` has in ``study`` (None for a section the study's method does not use)."""
    section, _, key = name.partition(".")
    if section not in (*JOB_SECTIONS, study.method):
        return None
    return getattr(getattr(study, section, None), key, None)


def restrict_space(params: dict[str, Param], row_study_) -> dict[str, Param]:
    """The part of the study's space that the row (``row_study_``: its method, its switches) can use.

    Dropped: another method's section (the base row keeps only train.* and model.*) and the keys the
    row's switches leave without effect (``MethodSpec.inert``, e.g. ``dias.lambda_dim`` in w/o L_dim).
    A condition on a dropped parameter is decided by the row's fixed value of it: the child stays,
    unconditional, where that value meets the condition, and goes where it does not."""
    spec = get_method(row_study_.method)
    section = getattr(row_study_, spec.name, None) if spec.section else None
    inert = {f"{spec.name}.{key}" for key in spec.inert(section)} if section is not None else set()
    sections = (*SHARED_SECTIONS, spec.name)
    own = {name for name in params if name not in inert and name.partition(".")[0] in sections}
    kept: dict[str, Param] = {}
    for name, param in ordered(params):
        if name not in own:
            continue
        settled = {other: value for other, value in param.when.items() if other not in kept}
        if not is_active(Param(type="categorical", choices=[0], when=settled),
                         {other: fixed_value(row_study_, other) for other in settled}):
            continue
        kept[name] = param.model_copy(update={"when": {o: v for o, v in param.when.items() if o in kept}})
    return kept


def row_search_study(study, row: Ablation, params: dict[str, Param], n: int, tune_dir: Path):
    """The row's search as a search study of its own: the row's method and switches, its space
    inline, Optuna TPE + ASHA with ``n`` trials seeded by ``train.seed``, stored in ``tune_dir/<slug>``.
    Validated like any search study's space (``resolve_space``), so a bad value fails before Ray."""
    s = study.search
    # One metric per row search (its best trial fixes the row): the study's, or its first objective.
    values = {"name": row_slug(row.name), "storage.path": str(tune_dir), "search.space": "none",
              "search.params": {name: p.model_dump(exclude_defaults=True) for name, p in params.items()},
              "search.algorithm": "optuna-tpe", "search.scheduler": "asha", "search.num_samples": n,
              "search.seed": study.train.seed, "search.metric": s.primary, "search.mode": s.primary_mode,
              "search.warm_start": ["defaults"] if "defaults" in (s.warm_start or []) else None,
              "search.pbt": {}}
    where = f"--tune-rows, row {row.name!r}"
    try:
        search = apply_params(row_study(study, row), values, where)
        resolve_space(search)
    except ConfigError as err:  # name the row: its switches may be what makes a value invalid
        message = str(err)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None
    return search


def no_search(metric: str) -> dict:
    """A row's entry in ``source["rows"]`` when its restricted space is empty: the study's values."""
    return {"params": [], "trial_id": None, "values": {}, metric: None}


def row_searches(study, rows: tuple[Ablation, ...], n: int) -> tuple[dict, dict]:
    """``({row: search study}, source)`` for ``--tune-rows n``: rows left with no parameter run no
    search and are recorded as such in ``source["rows"]`` now."""
    if n < 1:
        raise ConfigError(f"--tune-rows {n}: give the number of search trials per row, at least 1")
    slugs = [row_slug(r.name) for r in rows]
    clash = sorted({s for s in slugs if slugs.count(s) > 1})
    if clash:
        raise ConfigError(f"--tune-rows: rows share the folder name {clash[0]!r}; rename one of them")
    whole = resolve_space(apply_params(study, {"search.algorithm": "optuna-tpe"}, "--tune-rows"))
    tune_dir = ablation_dir_of(study) / TUNE_DIR
    s = study.search
    source = {"tune_rows": n, "metric": s.primary, "mode": s.primary_mode, "rows": {}}
    searches = {}
    for row in rows:
        params = restrict_space(whole, row_study(study, row))
        if params:
            searches[row.name] = row_search_study(study, row, params, n, tune_dir)
        else:
            source["rows"][row.name] = no_search(s.primary)
    return searches, source


def row_jobs(study, rows: tuple[Ablation, ...], values: dict[str, dict]) -> dict[str, dict]:
    """One job per row at the row's own values (``values[row]``, empty = the study's)."""
    jobs = {}
    for row in rows:
        tuned = apply_params(study, values.get(row.name, {}), f"best trial of row {row.name!r}")
        jobs[row.name] = row_study(tuned, row).job().model_dump(mode="json")
    return jobs


def tuned_plan(plan: AblationPlan, source: dict) -> AblationPlan:
    """``plan`` with each row's job at its search's best values (every row's search has finished)."""
    missing = [r.name for r in plan.rows if r.name not in source["rows"]]
    if missing:
        raise ConfigError(f"--tune-rows: no finished search for row {missing[0]!r}")
    values = {name: entry["values"] for name, entry in source["rows"].items()}
    return replace(plan, jobs=row_jobs(plan.study, plan.rows, values), source=source)


def describe_source(source: dict) -> list[str]:
    """One line per row of a ``--tune-rows`` source (what the command prints), else nothing."""
    if "tune_rows" not in source:
        return []
    metric, lines = source["metric"], []
    for row, entry in source["rows"].items():
        if entry["trial_id"] is None:
            lines.append(f"{row}: nothing to search (no parameter of the space applies): the study's values")
            continue
        values = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in entry["values"].items())
        lines.append(f"{row}: best of {source['tune_rows']} trials {entry['trial_id']} "
                     f"({metric} {entry[metric]:.1f}): {values}")
    return lines


def check_sources(from_study: str | None, tune_rows: int | None, pick: str | None = None) -> None:
    """``--from-study`` (one search for all rows) and ``--tune-rows`` (one per row) exclude each other;
    ``--pick`` chooses a trial of the ``--from-study`` study."""
    if from_study is not None and tune_rows is not None:
        raise ConfigError("--from-study and --tune-rows are two sources of the rows' values: "
                          "give one of them")
    if pick is not None and from_study is None:
        raise ConfigError("--pick chooses a trial of the --from-study study: give --from-study too")


def plan_ablation(study, from_study: str | None = None, tune_rows: int | None = None,
                  pick: str | None = None) -> AblationPlan:
    """Rows, seeds and one validated job per row; raises a one-line ConfigError on any problem.
    With ``tune_rows`` the jobs are at the study's values until ``tuned_plan`` sets each row's own;
    ``pick``: which trial of ``from_study`` (``study/results.py`` ``pick_trial``)."""
    check_sources(from_study, tune_rows, pick)
    rows = select_rows(study.method, study.ablation.variants)
    seeds = check_seeds(list(study.ablation.seeds))
    source, searches = {}, {}
    if from_study is not None:
        values, source = best_trial_values(find_study_dir(from_study, study.storage.path), study.method, pick)
        study = apply_params(study, values)
        source["values"] = values
    if tune_rows is not None:
        searches, source = row_searches(study, rows, tune_rows)
    jobs = {row.name: row_study(study, row).job().model_dump(mode="json") for row in rows}
    return AblationPlan(study, rows, seeds, jobs, source, searches)
