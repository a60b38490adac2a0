"""``method: base`` — the shared base model alone (the control row of every ablation table)."""

from __future__ import annotations

from trainables.config import JobConfig
from trainables.methods.spec import Ablation, MethodSpec
from trainables.model import ITMModel


def build(job: JobConfig, image_dim: int) -> ITMModel:
    return ITMModel(image_dim, job.model, job.train)


SPEC = MethodSpec(
    name="base",
    build=build,
    ablations=(Ablation("base", "base"),),
)
