"""The GPU check's dry run (every check on the CPU at tiny shapes) and its results.md merge."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_runs_every_check_and_passes(tmp_path):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    section = out.read_text()
    assert section.startswith(gpu_check.SECTION + " (CPU dry run")
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| check |")]
    checks = " ".join(rows)
    for method in gpu_check.METHODS:
        assert f"precision, {method}" in checks and f"step samples/s, {method}" in checks
    for what in ("loader samples/s, 0 workers", "loader samples/s, 4 workers", "checkpoint round trip",
                 "study-file check before Ray", "retrieval_metrics"):
        assert what in checks, what
    assert "FAIL" not in section and "error:" not in section
    # The layout check reports the one-line study-file error, not an acceptance.
    layout = next(row for row in rows if "study-file check" in row)
    assert "| pass |" in layout and "accepted" not in layout


def test_merge_replaces_the_gpu_section_and_keeps_the_rest(tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# Benchmark results\n\n| what | figure |\n|---|---|\n| a | 1 |\n")
    gpu_check.merge(f"{gpu_check.SECTION} (GPU one)\n\n| check | figure | verdict |\n", results)
    gpu_check.merge(f"{gpu_check.SECTION} (GPU two)\n\n| check | figure | verdict |\n", results)
    text = results.read_text()
    assert text.count(gpu_check.SECTION) == 1 and "GPU two" in text and "GPU one" not in text
    assert "| a | 1 |" in text


def test_a_failed_check_fails_the_run_and_is_reported(monkeypatch):
    """One broken check becomes a FAIL row; the others still run and the exit code says so."""
    import torch

    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    ran = []
    monkeypatch.setattr(gpu_check, "write_data", lambda root, shapes: root)
    monkeypatch.setattr(gpu_check, "check_precision", broken)
    monkeypatch.setattr(gpu_check, "check_steps", lambda *a: ([gpu_check.Row("steps", "1")], {"base": 1.0}))
    for name in ("check_loader", "check_resume", "check_layout", "check_eval"):
        monkeypatch.setattr(gpu_check, name, lambda *a, _n=name: ran.append(_n) or [gpu_check.Row(_n, "ok")])
    rows = gpu_check.run_checks(torch.device("cpu"))
    assert rows[0].verdict == "FAIL" and "planted" in rows[0].figure
    assert ran == ["check_loader", "check_resume", "check_layout", "check_eval"]
