"""Peak memory of one training epoch's loader: memory-mapped features vs features loaded into RAM.

    python -m benchmarks.data_rss                   # 1x = the demo's 1,000 train images, and 4x
    python -m benchmarks.data_rss --images 2000 --scales 1,4,8

For each size a synthetic benchmark is written to a temp dir (``write_synth``), then one child
process per (size, mode) iterates every batch of one training epoch (``build_train_loader`` with the
tiny tokenizer, batch 128, region dropout on; no model) over the train split, either as
``PrecompSplit`` opens it (``np.load(mmap_mode="r")``, the default) or with the feature array
replaced by a full ``np.load`` (what a loader without mmap does); captions are memory-mapped line
offsets in both modes (``CaptionLines``). The child samples
``/proc/self/status`` after every batch and reports, relative to just before the split was opened:
the peak anonymous memory (``RssAnon``: private heap, what memory-mapping saves) and the peak
total RSS (``VmHWM``; it also counts the file's page-cache pages the epoch touched, which the
kernel may drop at any time). ``getrusage(...).ru_maxrss`` is not used: on Linux a child started
from this (large) parent can inherit the parent's high-water mark across fork + exec.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._common import ROOT, command, record, status_kb

MODES = ("mmap", "loaded")


def memory_now() -> dict[str, int]:
    return {field: status_kb(field) or 0 for field in ("VmRSS", "RssAnon", "RssFile")}


def iterate_epoch(root: str, mode: str, batch_size: int) -> dict:
    """Child side: open the train split in ``mode``, run one epoch of the loader, return peaks in kB."""
    from trainables.config import DataConfig
    from trainables.data import PrecompSplit, build_train_loader, set_epoch
    from trainables.text_models import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    before = memory_now()
    split = PrecompSplit(root, "train")
    if mode == "loaded":
        split.images = np.load(Path(root) / "train_ims.npy")[: split.n_images]  # whole array in RAM
    loader = build_train_loader(DataConfig(root=root), split, tokenizer, batch_size, seed=0)
    set_epoch(loader, 0)
    peak = dict(before)
    batches = 0
    for _ in loader:
        batches += 1
        peak = {key: max(peak[key], value) for key, value in memory_now().items()}
    return {"batches": batches, "images": split.n_images, "file_mb": split.images.nbytes / 2**20,
            "anon_mb": (peak["RssAnon"] - before["RssAnon"]) / 1024,
            "rss_mb": ((status_kb("VmHWM") or peak["VmRSS"]) - before["VmRSS"]) / 1024,
            "file_pages_mb": (peak["RssFile"] - before["RssFile"]) / 1024}


def run_child(root: Path, mode: str, batch_size: int) -> dict:
    """One fresh interpreter per measurement, so no mode inherits the other's heap or mappings."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.data_rss", "--child", str(root), "--mode", mode,
                          "--batch", str(batch_size)], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="train images at scale 1 (the demo uses 1,000)")
    parser.add_argument("--scales", default="1,4", help="comma-separated multiples of --images")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--record", default=None, help="append the figures (JSON lines) to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: dataset root to measure
    parser.add_argument("--mode", choices=MODES, default="mmap", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(iterate_epoch(args.child, args.mode, args.batch)))
        return 0

    from trainables.data import write_synth

    results: dict[tuple[int, str], dict] = {}
    scales = [int(s) for s in args.scales.split(",")]
    print(f"{'images':>7} {'file MB':>8} {'mode':>7} {'batches':>7} {'anon MB':>8} {'RSS MB':>8} "
          f"{'file pages MB':>13}")
    for scale in scales:
        with tempfile.TemporaryDirectory(prefix="itm-rss-") as root:
            write_synth(root, images=scale * args.images)
            for mode in MODES:
                r = results[scale, mode] = run_child(Path(root), mode, args.batch)
                print(f"{r['images']:7d} {r['file_mb']:8.1f} {mode:>7} {r['batches']:7d} {r['anon_mb']:8.1f} "
                      f"{r['rss_mb']:8.1f} {r['file_pages_mb']:13.1f}")
    cmd = command("benchmarks.data_rss", argv)
    lo, hi = scales[0], scales[-1]
    for mode in MODES:
        a, b = results[lo, mode], results[hi, mode]
        record(args.record, f"epoch loader peak memory, {mode}, {a['images']:,} vs {b['images']:,} train images "
               f"({a['file_mb']:.0f} vs {b['file_mb']:.0f} MB of features)",
               f"anonymous +{a['anon_mb']:.0f} vs +{b['anon_mb']:.0f} MB; total RSS +{a['rss_mb']:.0f} vs "
               f"+{b['rss_mb']:.0f} MB (x{b['anon_mb'] / max(a['anon_mb'], 1e-9):.2f} anonymous)", cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
