"""What a method registers: its ``MethodSpec`` and the ``Ablation`` rows of its table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from trainables.config import JobConfig
from trainables.errors import ConfigError

if TYPE_CHECKING:  # torch loads only when a model is built: the study file validates without it
    from trainables.model import ITMModel


@dataclass(frozen=True)
class Ablation:
    """One row of a method's ablation table: run ``method`` with ``overrides`` on its section."""

    name: str
    method: str
    overrides: dict = field(default_factory=dict)


def no_inert_keys(section) -> frozenset[str]:
    return frozenset()


@dataclass(frozen=True)
class MethodSpec:
    name: str
    build: Callable[[JobConfig, int], ITMModel]  # (job, image feature dim) -> model
    section: type[BaseModel] | None = None  # the study file's section schema; None = no section
    searchable: tuple[str, ...] = ()  # keys of the section a search space may vary
    ablations: tuple[Ablation, ...] = ()
    # section -> the searchable keys its switches (use_*) leave without effect, e.g. lambda_dim once
    # use_dim is off: a per-row search (``ablate --tune-rows``) spends no trials on them.
    inert: Callable[[BaseModel], frozenset[str]] = no_inert_keys

    def parse_section(self, params: dict) -> BaseModel | None:
        if self.section is None:
            if params:
                raise ConfigError(f"method {self.name!r} takes no parameters, got {sorted(params)}")
            return None
        try:
            return self.section(**params)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in (self.name, *first["loc"]))
            raise ConfigError(f"{where}: {first['msg']}") from None
