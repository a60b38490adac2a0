"""Helpers shared by the benchmark scripts: the reproducing command, result records, a local Ray,
/proc memory readings and the small synthetic datasets the benchmarks train on.

Every script accepts ``--record FILE``: each figure it measures is appended there as one JSON line
``{"what", "figure", "command"}``; ``benchmarks/quick.py`` turns those lines into ``results.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "out"


def command(module: str, argv: list[str] | None) -> str:
    """The command line that reproduces this run (``--record`` left out: it only says where to write)."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--record":
            skip = True
            continue
        if arg.startswith("--record="):
            continue
        kept.append(arg)
    return " ".join(["python -m", module, *map(shlex.quote, kept)])


def record(path: str | None, what: str, figure: str, cmd: str) -> None:
    """Print one figure with its command, and append it to ``path`` (JSON lines) if given."""
    print(f"FIGURE  {what}: {figure}   [{cmd}]")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"what": what, "figure": figure, "command": cmd}) + "\n")


def status_kb(field: str, pid: str = "self") -> int | None:
    """One ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM, RssAnon, RssFile, ...); None off Linux."""
    try:
        with open(f"/proc/{pid}/status") as status:
            found = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def quiet_env() -> None:
    """Environment every benchmark that starts Ray or loads a tokenizer wants (set before importing Ray)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextlib.contextmanager
def local_ray(num_cpus: int = 2):
    """A private local Ray on ``num_cpus`` CPUs, session files in a fresh temp dir; shut down and
    removed on exit."""
    quiet_env()
    import ray

    # Ray's socket paths must stay short (107 bytes), hence a short private dir directly under /tmp.
    session_dir = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=session_dir, logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}})
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(session_dir, ignore_errors=True)


def synth_dataset(out: str | Path, images: int, seed: int = 0) -> Path:
    """Write the embedded benchmark (train ``images``, dev ``max(100, images//4)``, test ``images//2``)."""
    from trainables.data import write_synth

    out = Path(out)
    if not (out / "synth.json").is_file():
        write_synth(out, images=images, seed=seed)
    return out


def smoke_study(overrides: list[str]):
    """``studies/smoke.yaml`` with ``--set``-style overrides, validated as the CLI does."""
    from study.config import load_study

    return load_study(ROOT / "studies" / "smoke.yaml", overrides)
