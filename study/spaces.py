"""Search spaces (``search_spaces/*.yaml``): typed parameters with conditions, checked against the
study's sections and the method registry before Ray starts, turned into an Optuna define-by-run
function (TPE / random) or a Tune grid.

A space file::

    method: dias
    params:
      train.lr:          {type: loguniform, low: 1.0e-5, high: 1.0e-3}
      dias.dim_loss:     {type: categorical, choices: [barlow, diag_share, dim_infonce]}
      dias.mask_temperature: {type: loguniform, low: 0.05, high: 1.0, when: {dias.sparsity_mode: soft}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from study.config import apply_params
from trainables.config import Section
from trainables.errors import ConfigError
from trainables.methods import get_method

SHARED_SECTIONS = ("train", "model")  # searchable by every method, besides the method's own section
MAX_GRID_INTS = 10_000  # an int range without explicit 'values' becomes at most this many grid points
ROOT = Path(__file__).resolve().parents[1]


class Param(Section):
    type: Literal["loguniform", "uniform", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False  # int only: sample on a log scale
    choices: list[Any] | None = None
    values: list[Any] | None = None  # explicit grid points for a numeric parameter (grid search)
    when: dict[str, Any] = Field(default_factory=dict)  # only sampled when these params have these values

    @model_validator(mode="after")
    def _ranges(self) -> "Param":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs 'low' and 'high'")
        if not self.low < self.high:
            raise ValueError(f"empty range: low {self.low} must be below high {self.high}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError("loguniform needs low > 0")
        if self.log and self.type != "int":
            raise ValueError(f"'log' applies to int only; for a {self.type} on a log scale use type: loguniform")
        if self.type == "int":
            if self.low != int(self.low) or self.high != int(self.high):
                raise ValueError(f"int needs whole-number bounds, got low {self.low} and high {self.high}")
            if self.log and self.low < 1:
                raise ValueError(f"int with log: true needs low >= 1, got {self.low:g}")
        return self

    def grid_points(self) -> list[Any] | None:
        if self.type == "categorical":
            return list(self.choices)
        if self.values is not None:
            return list(self.values)
        if self.type == "int" and self.high - self.low < MAX_GRID_INTS:
            return list(range(int(self.low), int(self.high) + 1))
        return None

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take (a choice, or inside the range)."""
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high and (self.type != "int" or value == int(value))

    def checked_values(self) -> list[Any]:
        """The values that stand for the whole parameter when it is validated: the choices or the
        explicit values, else the two ends of the range (every value between is valid if they are)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.values is not None:
            return list(self.values)
        return [int(self.low), int(self.high)] if self.type == "int" else [self.low, self.high]


class Space(Section):
    method: str | None = None
    params: dict[str, Param]


def load_space_file(path: str | Path) -> Space:
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path  # shipped spaces resolve from the project root
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {'is empty' if raw is None else 'is not a mapping'}; a search space "
                          "file holds method: and params: {NAME: {type: ..., ...}}")
    try:
        return Space(**raw)
    except (ValidationError, TypeError) as err:
        raise ConfigError(f"{path}: {first_problem(err)}") from None


def first_problem(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return str(err)


def default_space_path(method: str) -> Path:
    return ROOT / "search_spaces" / f"{method}.yaml"


def resolve_space(study) -> dict[str, Param]:
    """The study's space: its file (or the method's default) with ``search.params`` merged on top."""
    space = study.search.space
    params, origins = {}, {}
    if space != "none":
        path = space or default_space_path(study.method)
        if space or Path(path).exists():
            params = dict(space_for(study, path).params)
            origins = dict.fromkeys(params, f"search space {path}")
    for name, raw in study.search.params.items():
        try:
            params[name] = Param(**raw) if isinstance(raw, dict) else Param(type="categorical", choices=list(raw))
        except (ValidationError, TypeError) as err:
            raise ConfigError(f"search.params.{name}: {first_problem(err)}") from None
        origins[name] = "search.params"
    if not params:
        raise ConfigError(f"the search space for {study.method!r} is empty: set search.space or search.params")
    check_space(study, params, origins)
    if study.search.algorithm == "pbt":
        check_pbt_space(study, params)
    warm_start_points(study, params)  # fails now, before anything is written, if a point is not in the space
    if study.search.algorithm == "grid":
        grid(params)  # fails now, before anything is written, if a parameter has no grid points
    return params


def space_for(study, path: str | Path) -> Space:
    """The space file at ``path``, which must be for the study's method when it names one."""
    space = load_space_file(path)
    if space.method is not None and space.method != study.method:
        raise ConfigError(f"search space {path} is for method {space.method!r} but the study's method is "
                          f"{study.method!r}; set search.space to a {study.method} space or change method:")
    return space


def check_space(study, params: dict[str, Param], origins: dict[str, str] | None = None) -> None:
    """Every parameter names a searchable key of the study, and every value it can take validates:
    checked symbolically (the ends of a range, the choices), never one integer at a time.
    ``origins``: where each parameter was given (a space file, ``search.params``), for the message."""
    allowed = _searchable(study, get_method(study.method))
    for name, param in params.items():
        where = (origins or {}).get(name, "search space")
        if name not in allowed:
            raise ConfigError(f"{where}: unknown parameter {name!r} for method {study.method!r}; "
                              f"searchable: {', '.join(sorted(allowed))}")
        for value in param.checked_values():
            try:
                apply_params(study, {name: value}, where)
            except ConfigError as err:
                problem = str(err).removeprefix(f"{where}: ")
                raise ConfigError(f"{where}: {name}={value!r} is not a valid value ({problem})") from None
        for other in param.when:
            if other not in params:
                raise ConfigError(f"{where}: {name!r} depends on {other!r}, which is not in the space")


def _searchable(study, spec) -> list[str]:
    names = [f"{s}.{k}" for s in SHARED_SECTIONS for k in type(getattr(study, s)).model_fields]
    return names + [f"{spec.name}.{key}" for key in spec.searchable]


def is_active(param: Param, chosen: dict[str, Any]) -> bool:
    return all(chosen.get(other) == value or (isinstance(value, list) and chosen.get(other) in value)
               for other, value in param.when.items())


def ordered(params: dict[str, Param]) -> list[tuple[str, Param]]:
    """Parameters with every condition's parent before its children."""
    done: list[tuple[str, Param]] = []
    pending = dict(params)
    while pending:
        ready = [n for n, p in pending.items() if all(o in dict(done) for o in p.when)]
        if not ready:
            raise ConfigError(f"search space: circular conditions among {', '.join(pending)}")
        for name in ready:
            done.append((name, pending.pop(name)))
    return done


class DefineByRun:
    """An Optuna define-by-run space: conditional parameters are suggested only when active.
    A class rather than a closure because Tune pickles the searcher into its experiment state.

    ``points``: the warm-start points (``warm_start_points``), enqueued into a fresh Optuna study, so
    they are its trials number 0, 1, ... (Optuna asks enqueued trials first, in order). Such a trial
    is labelled in its config under ``WARM_START_KEY`` (Ray adds what this returns to the config), so
    results.csv, the report and MLflow can mark it without a map from Optuna to Tune trials; a
    sampled trial that happens to take a partial point's values is not one."""

    def __init__(self, params: dict[str, Param], points: list[tuple[str, dict]] = ()):
        self.order = ordered(params)
        self.points = list(points)

    def __call__(self, trial) -> dict[str, str] | None:
        chosen = self.suggest(trial)
        label = warm_start_label(trial.number, chosen, self.points)
        return {WARM_START_KEY: label} if label else None

    def suggest(self, trial) -> dict[str, Any]:
        chosen: dict[str, Any] = {}
        for name, param in self.order:
            if not is_active(param, chosen):
                continue
            if param.type == "categorical":
                chosen[name] = trial.suggest_categorical(name, param.choices)
            elif param.type == "int":
                chosen[name] = trial.suggest_int(name, int(param.low), int(param.high), log=param.log)
            else:
                chosen[name] = trial.suggest_float(name, param.low, param.high, log=param.type == "loguniform")
        return chosen


def grid(params: dict[str, Param]) -> dict[str, list[Any]]:
    points = {}
    for name, param in params.items():
        values = param.grid_points()
        if values is None:
            kind = "continuous" if param.type != "int" else f"int ({MAX_GRID_INTS:,}+ values)"
            raise ConfigError(f"search space: grid search needs 'values' for {kind} parameter {name!r}")
        if param.when:
            raise ConfigError(f"search space: grid search does not support conditions ({name!r})")
        points[name] = values
    return points


# --------------------------------------------------------------------------------------------------
# Warm start: the method's shipped defaults and listed partial configs as the first trials
# --------------------------------------------------------------------------------------------------

WARM_START_KEY = "warm_start"  # a trial config's label of its warm-start point (no dot: not a study key)
DEFAULTS = "defaults"


def shipped_defaults(study, names) -> dict[str, Any]:
    """The shipped default (the section's schema default, METHODS.md) of each ``section.key``."""
    return {name: getattr(type(getattr(study, name.partition(".")[0]))(), name.partition(".")[2])
            for name in names}


def active_values(params: dict[str, Param], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` less the conditional parameters their own parents' values leave unused."""
    chosen: dict[str, Any] = {}
    for name, param in ordered(params):
        if name in values and is_active(param, chosen):
            chosen[name] = values[name]
    return chosen


def check_point(params: dict[str, Param], label: str, values: dict[str, Any]) -> None:
    """Every value of a warm-start point names a parameter of the space and lies inside it."""
    where = f"search.warm_start ({label})"
    for name, value in values.items():
        if name not in params:
            raise ConfigError(f"{where}: {name!r} is not a parameter of the search space; a warm-start point "
                              f"sets searched values only: {', '.join(params)}")
        param = params[name]
        if not param.contains(value):
            span = param.choices if param.type == "categorical" else f"{param.type} {param.low:g} … {param.high:g}"
            hint = " (a string: write numbers like 1.0e-3, with a dot)" if isinstance(value, str) else ""
            raise ConfigError(f"{where}: {name}={value!r}{hint} lies outside the search space ({span}); widen "
                              "the range or change the point")
    unused = set(values) - set(active_values(params, values))
    if unused:
        raise ConfigError(f"{where}: {', '.join(sorted(unused))} is not used with this point's other values "
                          "(its 'when' condition is not met); drop it")


def warm_start_points(study, params: dict[str, Param]) -> list[tuple[str, dict[str, Any]]]:
    """``[(label, {name: value})]`` in the study file's order: ``defaults`` = the shipped default of
    every searched parameter (conditional ones only where their parents' defaults use them), a
    listed partial config as given (``listed N``, its place in the list). Checked before Ray starts."""
    points, labels = [], set()
    for number, item in enumerate(study.search.warm_start or [], 1):
        if item == DEFAULTS:
            label, values = DEFAULTS, active_values(params, shipped_defaults(study, params))
        else:
            label, values = f"listed {number}", dict(item)
        if label in labels:
            raise ConfigError("search.warm_start lists 'defaults' twice")
        if not values:
            raise ConfigError(f"search.warm_start ({label}): an empty point; give some {{section.key: value}}")
        check_point(params, label, values)
        points.append((label, values))
        labels.add(label)
    return points


def warm_start_label(number: int, chosen: dict[str, Any], points: list[tuple[str, dict]]) -> str | None:
    """The label of Optuna trial ``number`` if it is the enqueued point of that number (it has the
    point's every value), else None."""
    if number >= len(points):
        return None
    label, values = points[number]
    return label if all(name in chosen and chosen[name] == value for name, value in values.items()) else None


# --------------------------------------------------------------------------------------------------
# Population Based Training: what it may mutate while a trial trains
# --------------------------------------------------------------------------------------------------

# The keys a PBT step may change mid-training: each method's loss weights, read from the trial's
# config at every step and kept in no checkpoint. An exploit restores the donor's model, optimiser and
# lr schedule, so a new lr, a learnable threshold's start value (a parameter or buffer) or an
# architecture key would be overwritten by the checkpoint or not fit it.
LOSS_WEIGHTS = {"dias": ("lambda_dim", "lambda_inter", "lambda_intra"), "cdds": ("alpha_m", "alpha_f", "alpha_x")}


def check_pbt_space(study, params: dict[str, Param]) -> None:
    """A PBT space holds loss weights only (``LOSS_WEIGHTS``), unconditional."""
    allowed = [f"{study.method}.{key}" for key in LOSS_WEIGHTS.get(study.method, ())]
    if not allowed:
        raise ConfigError(f"search.algorithm pbt mutates loss weights, and method {study.method!r} has none; "
                          "use optuna-tpe")
    other = [name for name in params if name not in allowed]
    if other:
        raise ConfigError(f"search.algorithm pbt: {', '.join(other)} cannot change while a trial trains (an "
                          "exploit restores the model, optimiser and lr from a checkpoint); set search.space: none "
                          f"and search.params to some of {', '.join(allowed)}")
    conditional = [name for name, param in params.items() if param.when]
    if conditional:
        raise ConfigError(f"search.algorithm pbt: drop the 'when' condition of {', '.join(conditional)}")


class ClipToSpace:
    """PBT's explore step multiplies a value by 1.2 or 0.8 without looking at its range; this brings
    every numeric value back inside the space (a class: Tune pickles the scheduler)."""

    def __init__(self, params: dict[str, Param]):
        self.bounds = {name: (p.low, p.high) for name, p in params.items() if p.type != "categorical"}

    def __call__(self, config: dict) -> dict:
        for name, (low, high) in self.bounds.items():
            if name in config:
                value = min(max(config[name], low), high)
                config[name] = type(config[name])(value)
        return config
