"""What a method registers: its ``MethodSpec`` and the ``Ablation`` rows of its table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError

from trainables.config import JobConfig
from trainables.errors import ConfigError
from trainables.model import ITMModel


@dataclass(frozen=True)
class Ablation:
    """One row of a method's ablation table: run ``method`` with ``overrides`` on its section."""

    name: str
    method: str
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    build: Callable[[JobConfig, int], ITMModel]  # (job, image feature dim) -> model
    section: type[BaseModel] | None = None  # the study file's section schema; None = no section
    searchable: tuple[str, ...] = ()  # keys of the section a search space may vary
    ablations: tuple[Ablation, ...] = ()

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
