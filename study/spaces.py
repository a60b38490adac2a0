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
        return self

    def grid_points(self) -> list[Any] | None:
        if self.type == "categorical":
            return list(self.choices)
        if self.values is not None:
            return list(self.values)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1))
        return None


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
        return Space(**raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({getattr(err, 'problem', err)})") from None
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
    if space == "none":
        params = {}
    else:
        path = space or default_space_path(study.method)
        params = dict(load_space_file(path).params) if (space or Path(path).exists()) else {}
    for name, raw in study.search.params.items():
        try:
            params[name] = Param(**raw) if isinstance(raw, dict) else Param(type="categorical", choices=list(raw))
        except (ValidationError, TypeError) as err:
            raise ConfigError(f"search.params.{name}: {first_problem(err)}") from None
    if not params:
        raise ConfigError(f"the search space for {study.method!r} is empty: set search.space or search.params")
    check_space(study, params)
    if study.search.algorithm == "grid":
        grid(params)  # fails now, before anything is written, if a parameter has no grid points
    return params


def check_space(study, params: dict[str, Param]) -> None:
    """Every parameter names a searchable key of the study, and every sampled value validates."""
    allowed = _searchable(study, get_method(study.method))
    for name, param in params.items():
        if name not in allowed:
            raise ConfigError(f"search space: unknown parameter {name!r} for method {study.method!r}; "
                              f"searchable: {', '.join(sorted(allowed))}")
        for value in param.grid_points() or [param.low, param.high]:
            try:
                apply_params(study, {name: value})
            except ConfigError as err:
                raise ConfigError(f"search space: {name}={value!r} is not a valid value ({err})") from None
        for other in param.when:
            if other not in params:
                raise ConfigError(f"search space: {name!r} depends on {other!r}, which is not in the space")


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
    A class rather than a closure because Tune pickles the searcher into its experiment state."""

    def __init__(self, params: dict[str, Param]):
        self.order = ordered(params)

    def __call__(self, trial) -> None:
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


def grid(params: dict[str, Param]) -> dict[str, list[Any]]:
    points = {}
    for name, param in params.items():
        values = param.grid_points()
        if values is None:
            raise ConfigError(f"search space: grid search needs 'values' for continuous parameter {name!r}")
        if param.when:
            raise ConfigError(f"search space: grid search does not support conditions ({name!r})")
        points[name] = values
    return points
