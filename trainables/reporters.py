"""The plain-process reporter: keeps metrics in memory and checkpoints in a local directory."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path


class LocalReporter:
    """``Reporter`` for tests, benchmarks and single-process runs (no Ray).

    Checkpoints go to ``out_dir/checkpoint_NNNN``; the newest ``keep`` are kept, so a new
    ``LocalReporter`` on the same directory resumes where the previous one stopped.
    """

    rank = 0
    world_size = 1

    def __init__(self, out_dir: str | Path, keep: int = 2):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.history: list[dict[str, float]] = []

    def _checkpoints(self) -> list[Path]:
        return sorted(self.out_dir.glob("checkpoint_*"))

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir is None:
            return
        target = self.out_dir / f"checkpoint_{int(metrics.get('epoch', len(self.history))):04d}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(checkpoint_dir, target)
        for old in self._checkpoints()[: -self.keep]:
            shutil.rmtree(old)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        checkpoints = self._checkpoints()
        yield str(checkpoints[-1]) if checkpoints else None
