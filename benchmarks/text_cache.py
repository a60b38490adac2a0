"""The frozen-encoder cache (``trainables/data/text_cache.py``) against re-encoding every epoch.

One process, one model on the demo job (``studies/demo.yaml``: MiniLM frozen, 1,000 images): a
training epoch and a validation + test evaluation, uncached and cached in alternating order so that
drifting machine load hits both alike, plus the one-off cost of building the cache for the three
splits. Reports wall and CPU seconds and their ratios (median of ``--rounds``).

    python -m benchmarks.text_cache --threads 1      # needs data/synth (python -m study data synth)

With 2 threads on a loaded 2-core machine OpenMP spin-waiting inflates both sides; use 1 there.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import ROOT
from study.config import load_study
from trainables.data import build_eval_loaders, build_train_loader, frozen_text, set_epoch
from trainables.evaluation import evaluate
from trainables.loop import TrainStep, open_splits, seed_everything, train_one_epoch
from trainables.methods import build_model
from trainables.text_models import load_tokenizer


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="text-cache-bench-") as tmp:
        data = Path(tmp) / "synth"  # a copy without .cache/: the build is measured from nothing
        shutil.copytree(ROOT / "data" / "synth", data, ignore=shutil.ignore_patterns(".cache"))
        job = load_study(str(ROOT / "studies" / "demo.yaml"), [f"data.root={data}"]).job()
        seed_everything(0)
        splits = open_splits(job)
        tokenizer = load_tokenizer(job.model.text_encoder)
        model = build_model(job, splits.train.feature_dim)
        backbone = model.text_encoder.backbone
        named = {"train": splits.train, "val": splits.val, "test": splits.test}
        wall, cpu, cached = timed(lambda: {name: frozen_text(job, backbone, split, tokenizer, device)
                                           for name, split in named.items()})
        captions = " + ".join(f"{name} {split.n_captions}" for name, split in named.items())
        print(f"cache build ({captions} captions): wall {wall:.1f} s, cpu {cpu:.1f} s", flush=True)
        optimizer = torch.optim.AdamW(model.param_groups(job.train.lr, job.train.text_lr_scale))
        net = TrainStep(model)
        loaders = {}
        for mode in ("uncached", "cached"):
            text = {name: (value if mode == "cached" else None) for name, value in cached.items()}
            loaders[mode] = (build_train_loader(job.data, splits.train, tokenizer, 128, seed=0, text=text["train"]),
                             build_eval_loaders(job.data, splits.val, tokenizer, 256, text=text["val"]),
                             build_eval_loaders(job.data, splits.test, tokenizer, 256, text=text["test"]))
        times = {(mode, part): [] for mode in loaders for part in ("train", "eval")}
        for r in range(args.rounds):
            for mode in (("uncached", "cached") if r % 2 == 0 else ("cached", "uncached")):
                train, val, test = loaders[mode]
                set_epoch(train, r + 1)
                times[mode, "train"].append(
                    timed(lambda: train_one_epoch(net, model, train, optimizer, job, r + 1, device))[:2])
                times[mode, "eval"].append(
                    timed(lambda: (evaluate(model, *val, device, 5), evaluate(model, *test, device, 5)))[:2])
        median = {key: (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
                  for key, runs in times.items()}
        for part in ("train", "eval"):
            (uw, uc), (cw, cc) = median["uncached", part], median["cached", part]
            print(f"{part:5s}: uncached wall {uw:.1f} s cpu {uc:.1f} s | cached wall {cw:.1f} s cpu {cc:.1f} s | "
                  f"ratio wall {uw / cw:.1f}x cpu {uc / cc:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
