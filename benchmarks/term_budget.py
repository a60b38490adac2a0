"""The term budget of every method (METHODS.md "Rules for both methods"), at init and after training.

    python -m benchmarks.term_budget                      # base, dias, cdds; about 3 minutes on 2 cores
    python -m benchmarks.term_budget --methods dias --epochs 3 --set dias.dim_loss=diag_share

For each method at its shipped defaults, on the embedded synthetic benchmark:

- **init**: each weighted term's value and its share of the gradient norm on the shared encoders
  (``trainables/budget.py``) on one training batch of a fresh model, in the post-warm-up loss form;
- **trained**: the same, measured by the loop on the first batch of the last epoch of a short
  ``fit`` (so after ``--epochs`` − 1 epochs of training);
- **ranges**: for every loss weight of the method's default search space (a parameter that changes
  ``LossOutput.weights``), the shares of the terms it weights with the weight at the low and at the
  high end of its range, the rest at defaults, on the init batch.

Target: every share at the defaults in [1 %, 80 %]; every range reaching ≤ 1 % at one end and
≥ 50 % at the other. Rows that miss it are marked.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from benchmarks._common import command, quiet_env, record, synth_dataset
from study.ablation.render import markdown_table

LOW, HIGH, RANGE_LOW, RANGE_HIGH = 0.01, 0.80, 0.01, 0.50


def study_for(method: str, data_root: Path, args, out: Path):
    from study.config import load_study

    overrides = [f"method={method}", f"data.root={data_root}", f"data.max_images={args.images}",
                 f"train.epochs={args.epochs}", f"train.batch_size={args.batch}", f"train.loss={args.loss}",
                 f"model.embed_dim={args.embed_dim}", f"storage.path={out}", *args.set]
    return load_study(Path(__file__).resolve().parents[1] / "studies" / "smoke.yaml", overrides)


def first_batch(job):
    """The first training batch as the model sees it in ``fit`` (``device_batch``: region dropout)."""
    import torch

    from trainables.data import PrecompSplit, build_train_loader, device_batch
    from trainables.text_models import load_tokenizer

    split = PrecompSplit(job.data.root, job.data.train_split, job.data.max_images)
    loader = build_train_loader(job.data, split, load_tokenizer(job.model.text_encoder), job.train.batch_size,
                                seed=job.train.seed)
    return split.feature_dim, device_batch(next(iter(loader)), torch.device("cpu"), job.data.region_dropout)


def budget_at_init(job, feature_dim: int, batch) -> tuple[dict, dict]:
    """(budget metrics, loss weights) of a fresh model on ``batch``, post-warm-up form."""
    from trainables.budget import term_budget
    from trainables.loop import TrainStep, seed_everything
    from trainables.methods import build_model

    seed_everything(job.train.seed)
    model = build_model(job, feature_dim).train()
    losses = TrainStep(model)(batch, job.train.warmup_epochs)
    return term_budget(losses.terms, losses.weights, model.shared_parameters()), losses.weights


def budget_trained(job, out: Path) -> dict:
    from trainables.loop import fit
    from trainables.reporters import LocalReporter

    history = fit(job, LocalReporter(out))
    return {k: v for k, v in history[-1].items() if k.startswith(("budget/", "weighted/"))} | {
        "rsum": history[-1].get("rsum", float("nan"))}


def budget_rows(method: str, init: dict, weights: dict, trained: dict) -> list[dict]:
    rows = []
    keys = sorted(k for k in init if k.startswith("budget/"))
    for key in keys:
        term = key.removeprefix("budget/")
        share, later = init[key], trained.get(key, float("nan"))
        verdict = "yes" if all(LOW <= s <= HIGH for s in (share, later)) else "NO"
        rows.append({"method": method, "term": term, "weight": weights.get(term, 1.0),
                     "weighted (init)": init[f"weighted/{term}"], "share (init)": share,
                     "share (trained)": later, "in [1 %, 80 %]": verdict if len(keys) > 1 else "only term"})
    return rows


def weight_params(study) -> dict:
    """The method's searched parameters that are loss weights, with their default-space ranges."""
    from study.spaces import default_space_path, load_space_file

    path = default_space_path(study.method)
    if not path.exists():
        return {}
    return {name: p for name, p in load_space_file(path).params.items()
            if name.startswith(f"{study.method}.") and p.type in ("loguniform", "uniform") }


def range_rows(study, feature_dim: int, batch, default_weights: dict) -> list[dict]:
    from study.config import apply_params

    rows = []
    for name, param in weight_params(study).items():
        ends = {}
        for end, value in (("low", param.low), ("high", param.high)):
            job = apply_params(study, {name: value}).job()
            init, weights = budget_at_init(job, feature_dim, batch)
            changed = [t for t in weights if weights[t] != default_weights.get(t, 1.0)]
            ends[end] = (value, {t: init[f"budget/{t}"] for t in changed})
        if not ends["low"][1] and not ends["high"][1]:
            continue  # not a loss weight (a threshold or temperature)
        for term in sorted(set(ends["low"][1]) | set(ends["high"][1])):
            lo, hi = ends["low"][1].get(term, float("nan")), ends["high"][1].get(term, float("nan"))
            spans = min(lo, hi) <= RANGE_LOW and max(lo, hi) >= RANGE_HIGH
            rows.append({"method": study.method, "parameter": name, "term": term,
                         "range": f"{ends['low'][0]:g} … {ends['high'][0]:g}",
                         "share at low": lo, "share at high": hi, "spans ≤1 % … ≥50 %": "yes" if spans else "NO"})
    return rows


def pct(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for column in frame.columns:
        if column.startswith("share"):
            frame[column] = frame[column].map(lambda v: f"{100 * v:.2f} %")
        elif column in ("weight", "weighted (init)"):
            frame[column] = frame[column].map(lambda v: f"{v:.4g}")
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="base,dias,cdds")
    parser.add_argument("--images", type=int, default=300, help="max_images of every split")
    parser.add_argument("--epochs", type=int, default=3, help="trained = measured at the start of the last epoch")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--embed-dim", type=int, default=256)
    # InfoNCE as in the smoke, demo and ablation-demo studies: hardest-negative triplets collapse with
    # the tiny random text encoder at batch 32-64 (studies/smoke.yaml).
    parser.add_argument("--loss", default="infonce", choices=["triplet", "infonce"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="study-file override")
    parser.add_argument("--no-ranges", action="store_true", help="skip the search-range ends")
    parser.add_argument("--record", default=None)
    args = parser.parse_args(argv)
    quiet_env()
    cmd = command("benchmarks.term_budget", argv)
    budgets, ranges = [], []
    with tempfile.TemporaryDirectory(prefix="term-budget-") as tmp:
        data = synth_dataset(Path(tmp) / "synth", images=max(args.images, 400))
        for method in args.methods.split(","):
            study = study_for(method, data, args, Path(tmp) / "results")
            feature_dim, batch = first_batch(study.job())
            init, weights = budget_at_init(study.job(), feature_dim, batch)
            trained = budget_trained(study.job(), Path(tmp) / f"run-{method}")
            budgets += budget_rows(method, init, weights, trained)
            if not args.no_ranges:
                ranges += range_rows(study, feature_dim, batch, weights)
            print(f"{method}: val rSum after {args.epochs} epochs = {trained['rsum']:.1f}", flush=True)
    print("\n" + markdown_table(pct(pd.DataFrame(budgets))))
    if ranges:
        print("\n" + markdown_table(pct(pd.DataFrame(ranges))))
    for row in budgets:
        record(args.record, f"{row['method']} {row['term']} share init / trained",
               f"{100 * row['share (init)']:.2f} % / {100 * row['share (trained)']:.2f} %", cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
