"""An epoch's loss terms and method stats, summed on the device and read by the host rarely.

A BERT-base step at batch 128 is launch-bound: every ``.item()`` / ``float(tensor)`` waits for the GPU
to drain its queue. So a step only adds its values to device-side sums (a stack, an add, a few
``where``s; no sync), and the host reads two things: the non-finite flag (``check``, every
``LOG_EVERY`` steps and at the end of the epoch) and the sums (``means``, once per epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from trainables.errors import NonFiniteLossError
from trainables.model import LossOutput


@dataclass
class _Group:
    """The sums of one set of names (a method reports the same names every step, so usually one)."""

    sums: Tensor  # [n] float32
    first_bad_step: Tensor  # [] int64: 0-based step of the first non-finite total, -1 if none
    first_bad_values: Tensor  # [n]: that step's values


def step_values(total: Tensor, losses: LossOutput) -> tuple[tuple[str, ...], Tensor]:
    """``("loss", "loss_<term>"..., "<stat>"...)`` and their values [n] float32 on the total's device.
    Stats may be 0-dim tensors or (older code) python floats, filled in on the device."""
    names = ("loss", *(f"loss_{name}" for name in losses.terms), *losses.stats)
    stats = [value.detach().float() if isinstance(value, Tensor) else total.new_full((), float(value))
             for value in losses.stats.values()]
    terms = [term.detach().float() for term in losses.terms.values()]
    values = torch.stack([total.detach().float(), *terms, *stats])
    return names, values


@dataclass
class StepStats:
    """Running sums of every step's ``step_values`` for epoch ``epoch`` (0-based), on the device.

    ``check`` raises ``NonFiniteLossError`` naming the first step whose total was NaN/inf, the steps
    that read covered and that step's term values. Between such a step and the read the loop keeps
    stepping (finding out at once would sync every step): the NaN gradients make the optimizer
    step write NaN into the parameters, so the model is lost, but the error is raised before the
    epoch reports metrics or writes a checkpoint, so nothing corrupted is published and the trial fails.
    """

    epoch: int
    steps: int = 0
    checked: int = 0  # steps covered by the last check
    groups: dict[tuple[str, ...], _Group] = field(default_factory=dict)

    def add(self, total: Tensor, losses: LossOutput) -> None:
        names, values = step_values(total, losses)
        group = self.groups.get(names)
        if group is None:
            group = self.groups[names] = _Group(torch.zeros_like(values),
                                                torch.full((), -1, dtype=torch.int64, device=values.device),
                                                torch.zeros_like(values))
        group.sums += values
        fresh = ~torch.isfinite(values[0]) & (group.first_bad_step < 0)
        group.first_bad_step = torch.where(fresh, self.steps, group.first_bad_step)
        group.first_bad_values = torch.where(fresh, values, group.first_bad_values)
        self.steps += 1

    def check(self) -> None:
        """One host read of the non-finite flags; raises on the first non-finite step so far."""
        bad = [(int(group.first_bad_step), names, group) for names, group in self.groups.items()]
        bad = [entry for entry in bad if entry[0] >= 0]
        first, checked = min(bad, key=lambda entry: entry[0]) if bad else None, self.checked
        self.checked = self.steps
        if first is None:
            return
        step, names, group = first
        values = dict(zip(names, group.first_bad_values.tolist()))
        terms = ", ".join(f"{name.removeprefix('loss_')}={value:.4g}" for name, value in values.items()
                          if name.startswith("loss_"))
        raise NonFiniteLossError(
            f"non-finite loss at epoch {self.epoch + 1} step {step + 1} ({terms}; found when checking "
            f"steps {checked + 1}-{self.steps}; nothing of this epoch was reported or checkpointed)")

    def means(self) -> dict[str, float]:
        """``check``, then every name's sum over the epoch's steps (one read per group)."""
        self.check()
        out: dict[str, float] = {}
        for names, group in self.groups.items():
            for name, value in zip(names, group.sums.tolist()):
                out[name] = out.get(name, 0.0) + value / self.steps
        return out
