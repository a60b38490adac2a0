"""The method registry: ``name -> MethodSpec``. A new method is one file plus one line here."""

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
    description: str = ""

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


from trainables.methods import base, cdds, dias  # noqa: E402  (modules register with the specs defined above)

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (base.SPEC, dias.SPEC, cdds.SPEC)}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def build_model(job: JobConfig, image_dim: int) -> ITMModel:
    return get_method(job.method).build(job, image_dim)
