"""The method registry: ``name -> MethodSpec``. A new method is one module plus one line here.

Importing it loads no torch: names, sections, searchable keys and ablation rows are plain data, and
each spec's ``build`` imports its model on use, so a bad study file fails in a fraction of a second.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainables.config import JobConfig
from trainables.errors import ConfigError
from trainables.methods import base, cdds, dias
from trainables.methods.spec import Ablation, MethodSpec

if TYPE_CHECKING:
    from trainables.model import ITMModel

__all__ = ["METHODS", "Ablation", "MethodSpec", "build_model", "get_method"]

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (base.SPEC, dias.SPEC, cdds.SPEC)}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def build_model(job: JobConfig, image_dim: int) -> ITMModel:
    return get_method(job.method).build(job, image_dim)
