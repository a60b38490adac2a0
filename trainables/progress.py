"""Our own console progress: one line per trial (or training run) epoch (Ray-free).

Tune's live table repeats every trial every half minute and Ray Train's per-report INFO dumps say
nothing a researcher reads. ``study/tuner.py`` turns Tune's callback events into calls here (on the
driver), and ``trainables/ray_train.py`` calls it from rank 0 of a ``study train`` run, so the
terminal shows what each trial is doing, when it happens:

    [ 3/12] w/o L_dim seed=1   epoch 2/3   loss 2.8511   val rSum 141.2   14 s
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class Progress:
    """Lines for trial start, every reported epoch, completion and failure.

    ``label(config, number)`` names a trial as its MLflow child run is named (so the console and the
    UI agree), ``detail(config)`` adds what its start line shows (a search trial's values); ``total`` is the number of trials the command will run, ``epochs`` each one's budget.
    """

    def __init__(self, label: Callable[[dict, int], str], total: int, epochs: int, metric: str = "rsum",
                 detail: Callable[[dict], str] = lambda config: "", out: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.epochs, self.metric, self.detail = label, total, epochs, metric, detail
        self.out, self.clock = out, clock
        self.names: dict[str, str] = {}
        self.numbers: dict[str, int] = {}
        self.since: dict[str, float] = {}  # trial id -> when its previous epoch (or its start) was seen

    def _print(self, text: str) -> None:
        # Not print(): inside a Ray Train worker print is patched to go to the stream and to the
        # root logger, and the line showed twice.
        out = self.out or sys.stdout
        out.write(text + "\n")
        out.flush()

    def _prefix(self, trial_id: str) -> str:
        width = len(str(self.total))
        return f"[{self.numbers[trial_id] + 1:>{width}}/{self.total}] {self.names[trial_id]}"

    def started(self, trial_id: str, config: dict) -> None:
        restarted = trial_id in self.numbers
        self.numbers.setdefault(trial_id, len(self.numbers))
        self.names[trial_id] = self.label(config, self.numbers[trial_id])
        self.since[trial_id] = self.clock()
        detail = self.detail(config)
        self._print(f"{self._prefix(trial_id)}   {'restarted' if restarted else 'started'}"
                    + (f"   {detail}" if detail else ""))

    def reported(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.numbers:  # a trial restored mid-way: its start was not seen here
            self.started(trial_id, result.get("config") or {})
        now = self.clock()
        seconds, self.since[trial_id] = now - self.since.get(trial_id, now), now
        epoch = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
        parts = [f"epoch {epoch}/{self.epochs}"]
        if isinstance(result.get("loss"), (int, float)):
            parts.append(f"loss {result['loss']:.4f}")
        if isinstance(result.get("rsum"), (int, float)):
            parts.append(f"val rSum {result['rsum']:.1f}")
        if self.metric != "rsum" and isinstance(result.get(self.metric), (int, float)):
            parts.append(f"{self.metric} {result[self.metric]:.4g}")
        parts.append(f"{seconds:.0f} s")
        self._print(f"{self._prefix(trial_id)}   " + "   ".join(parts))

    def completed(self, trial_id: str, epochs_done: int) -> None:
        if trial_id not in self.numbers:
            return
        how = "done" if epochs_done >= self.epochs else f"stopped early by the scheduler after epoch {epochs_done}"
        self._print(f"{self._prefix(trial_id)}   {how}")

    def failed(self, trial_id: str, error: str) -> None:
        if trial_id not in self.numbers:
            return
        self._print(f"{self._prefix(trial_id)}   FAILED: {error}")
