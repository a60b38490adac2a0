"""The quick benchmark subset behind ``make bench``: runs each script, then writes ``results.md``.

    python -m benchmarks.quick                  # about 5 minutes on 2 cores
    python -m benchmarks.quick --only eval_speed,data_rss

Each script runs in its own interpreter (so memory and thread settings do not leak between them)
with ``--record``; the figures they append become the table of ``benchmarks/results.md``, each with
the command that reproduces it. A script that fails is listed under "Failed" and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import ROOT

QUICK = {
    "eval_speed": [],  # the COCO-5K size: at 1K the matrix sits in cache and pass counts mean little
    "train_step": ["--text-encoder", "tiny"],
    "data_rss": [],
    "ray_overhead": [],
}


def run_script(name: str, args: list[str], record_path: str) -> bool:
    print(f"\n=== python -m benchmarks.{name} {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args, "--record", record_path], cwd=ROOT,
                          check=False)
    return done.returncode == 0


def machine() -> str:
    import torch

    return (f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def render(figures: list[dict], failed: list[str], loads: tuple[str, str]) -> str:
    written = (f"Written by `make bench` (`python -m benchmarks.quick`) on "
               f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; {machine()}; "
               f"load average (1/5/15 min) {loads[0]} before, {loads[1]} after.")
    lines = ["# Benchmark results", "", written, "",
             "Each figure is measured in one run of the command beside it (from the repository root).", "",
             "| what | figure | command |", "|---|---|---|"]
    lines += [f"| {f['what']} | {f['figure']} | `{f['command']}` |" for f in figures]
    if failed:
        lines += ["", "Failed: " + ", ".join(f"`python -m benchmarks.{name}`" for name in failed)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(QUICK), help="comma-separated subset of: " + ", ".join(QUICK))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results.md"))
    args = parser.parse_args(argv)
    before = load()
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", prefix="itm-bench-") as records:
        failed = [name for name in args.only.split(",") if not run_script(name, QUICK[name], records.name)]
        figures = [json.loads(line) for line in Path(records.name).read_text().splitlines() if line.strip()]
    Path(args.out).write_text(render(figures, failed, (before, load())))
    print(f"\nwrote {args.out} ({len(figures)} figures{', failed: ' + ', '.join(failed) if failed else ''})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
