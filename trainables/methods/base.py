"""``method: base`` — the shared base model alone (the control row of every ablation table)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainables.config import JobConfig
from trainables.methods.spec import Ablation, MethodSpec

if TYPE_CHECKING:
    from trainables.model import ITMModel


def build(job: JobConfig, image_dim: int) -> ITMModel:
    from trainables.model import ITMModel  # torch loads on use: the registry imports without it

    return ITMModel(image_dim, job.model, job.train)


SPEC = MethodSpec(
    name="base",
    build=build,
    ablations=(Ablation("base", "base"),),
)
