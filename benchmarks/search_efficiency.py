"""Search efficiency: does TPE + ASHA find a good configuration in fewer trial-epochs than random + FIFO?

    python -m benchmarks.search_efficiency             # the design below: 3 arms x 5 seeds x 48 trials
    python -m benchmarks.search_efficiency --trials 4 --seeds 0 --epochs 2    # a smoke run, minutes
    python -m benchmarks.search_efficiency --from-curves benchmarks/out/search_curves.csv  # tables, plot

The design, fixed before the first full run (issue 16 item 3; the 24-trial version drew the best
rSum during the random start-up every arm shares, and its 3-epoch, 150-image trials were too noisy):

- **Problem.** ``studies/demo-search.yaml`` (DIAS, d 64, batch 32, InfoNCE) with its shipped search
  space (``search_spaces/dias.yaml``: lr, the three loss weights, sparsity_k, dim_loss), unchanged.
  Two changes make a trial cheap: the text encoder is MiniLM, frozen, its outputs cached once per
  split (``model.freeze_text``, ``model.cache_text``; built before the first run), and pooling is
  mean instead of GPO (measured: 0.46 instead of 0.96 CPU s per epoch, the same rSum after 3
  epochs). A pretrained text side also makes a trial's rSum depend on the searched values rather
  than on how far a random text encoder got. Data: the synthetic benchmark, training split cut to
  its first 150 images (750 captions), validation on the whole 500-image dev split (2,500
  captions, against the old 150: less rSum noise), no test split (the search never reads it).
- **Fidelity.** 4 epochs per trial (``--epochs``). ASHA keeps the study file's rungs: grace period 1,
  reduction factor 2, so a trial can be stopped after epoch 1 or 2 of 4 (rungs at grace x factor^k,
  none at the last epoch, as in Ray's ASHA).
- **Arms.** tpe+asha (ours, as shipped: Optuna's default 10 random start-up trials), random+fifo
  (the obvious alternative), random+asha (separates ASHA's share from TPE's). ``--arms`` adds tpe+fifo.
- **Pairing.** 5 search seeds (0-4), each run by every arm with ``search.seed`` = the seed. The random
  arms then try the same configurations in the same order, and TPE's start-up trials are drawn
  from the same seed; differences between arms on one seed come from the method, not the draw.
- **Search.** 48 trials per run, one after another, in one process: the study's sampler exactly as
  ``study/tuner.py`` builds it (``TPESampler(seed)`` with Optuna's default start-up, or
  ``RandomSampler(seed)``) over the same define-by-run space, ``fit`` as a trial runs it, and ASHA as
  Optuna's own ``SuccessiveHalvingPruner`` (same grace period and reduction factor, asked after every
  epoch but the last). Not Ray Tune: on this 2-core machine, loaded by other work, a Tune trial's
  first epoch took 13-21 s (its later ones 4-7 s; start-up, and a checkpoint that carries the frozen
  MiniLM), while in process a trial's set-up costs 0.5 CPU s; 720 Tune trials did not fit in the hour.
  One trial at a time also makes TPE see every result before its next proposal (Tune runs 2 at
  once) and makes a run repeatable. ``--engine ray`` runs the same arms through ``run_study``
  instead (Ray Tune's ``ASHAScheduler``, 2 concurrent trials), for a machine with the time.
- **Measures.** Every epoch any trial reports, in time order, gives the best validation rSum so far
  against the cumulative trial-epochs spent (an ASHA-stopped trial costs only the epochs it ran).
  Per arm: the final best rSum, mean over seeds with a 95% t-interval (``scipy.stats``); trial-epochs
  spent; trial-epochs until the best-so-far reaches 95% of the best rSum any run found (one target
  for all runs). A run that never reaches it counts with all its trial-epochs, a lower bound, and is
  shown as such. The target of the issue, TPE + ASHA within 1/3 of random + FIFO's trial-epochs to
  that level, is read from the per-seed ratio (geometric mean, 95% t-interval of its log).

Writes ``search_efficiency.{csv,md,png}`` and ``search_curves.csv`` under ``--out``
(``benchmarks/out/``, git-ignored; the committed copies are in ``benchmarks/figures/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from benchmarks._common import OUT_DIR, ROOT, command, local_ray, quiet_env, record

ARMS = {"tpe+asha": ("optuna-tpe", "asha"), "random+fifo": ("random", "fifo"),
        "random+asha": ("random", "asha"), "tpe+fifo": ("optuna-tpe", "fifo")}
OURS, BASELINE = "tpe+asha", "random+fifo"
TARGET_FRACTION = 0.95  # of the best rSum any run found
TARGET_RATIO = 1 / 3  # the target: ours needs at most this share of the baseline's trial-epochs
CONFIDENCE = 0.95


# --------------------------------------------------------------------------------------------------
# Running the studies
# --------------------------------------------------------------------------------------------------


def bench_data(out: Path, train_images: int, val_images: int) -> Path:
    """The synthetic benchmark with a ``val_images`` dev split and its train split cut to the first
    ``train_images`` images (``data.max_images`` would cut the dev split too); no test split."""
    from trainables.data import write_synth

    if train_images > 4 * val_images:
        raise SystemExit(f"--train-images {train_images} needs --val-images >= {math.ceil(train_images / 4)}")
    write_synth(out, images=4 * val_images)  # dev = images // 4
    ims = np.load(out / "train_ims.npy")
    np.save(out / "train_ims.npy", ims[:train_images])
    for name, per_image in (("train_caps.txt", 5), ("train_ids.txt", 1)):
        lines = (out / name).read_text().splitlines(keepends=True)
        (out / name).write_text("".join(lines[:per_image * train_images]))
    for name in ("test_ims.npy", "test_caps.txt", "test_ids.txt"):
        (out / name).unlink()
    return out


def bench_study(arm: str, seed: int, args, data_root: Path, tmp: Path):
    """``demo-search.yaml`` as the design says, searched by ``arm`` with ``search.seed`` = ``seed``."""
    from study.config import load_study

    algorithm, scheduler = ARMS[arm]
    return load_study(ROOT / "studies" / "demo-search.yaml", [
        f"name=bench-search-{arm.replace('+', '-')}-s{seed}", f"data.root={data_root}", "data.test_split=''",
        f"model.text_encoder={args.text_encoder}", f"model.freeze_text={args.text_encoder != 'tiny'}",
        f"model.pooling={args.pooling}",
        f"search.space={ROOT / 'search_spaces' / 'dias.yaml'}", f"train.epochs={args.epochs}",
        f"search.num_samples={args.trials}", f"search.algorithm={algorithm}", f"search.scheduler={scheduler}",
        f"search.seed={seed}", f"storage.path={tmp / 'results'}",
        f"tracking.uri=sqlite:///{tmp / 'mlruns.db'}"])


def warm_text_cache(study) -> None:
    """Encode the train and dev captions once, before any run, so that no run's first trials wait
    for it (with ``model.freeze_text`` off there is nothing to do)."""
    import torch

    from trainables.data import frozen_text
    from trainables.loop import open_splits
    from trainables.methods import build_model
    from trainables.text_models import load_tokenizer

    job = study.job()
    if not job.model.freeze_text:
        return
    splits = open_splits(job)
    model = build_model(job, splits.train.feature_dim)
    tokenizer = load_tokenizer(job.model.text_encoder)
    for split in (splits.train, splits.val):
        frozen_text(job, model.text_encoder.backbone, split, tokenizer, torch.device("cpu"))


def epoch_rows(study_dir: Path) -> pd.DataFrame:
    """Every epoch reported by every trial of a study, in time order, with the cumulative
    trial-epochs and the best rSum so far."""
    rows = []
    for path in sorted(study_dir.glob("trial_*/result.json")):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows.append({"trial": path.parent.name, "epoch": r["training_iteration"],
                             "rsum": r.get("rsum"), "timestamp": r["timestamp"],
                             "time_total_s": r["time_total_s"]})
    return with_best_so_far(pd.DataFrame(rows).sort_values(["timestamp", "time_total_s"]))


def with_best_so_far(frame: pd.DataFrame) -> pd.DataFrame:
    """Epochs in the order they were spent, numbered (cumulative trial-epochs), with the best rSum so far."""
    frame = frame.reset_index(drop=True)
    frame["trial_epochs"] = range(1, len(frame) + 1)
    frame["best_rsum"] = frame["rsum"].cummax()
    return frame


class PruningReporter:
    """``fit``'s Reporter for one in-process Optuna trial: keeps every epoch's rSum and asks the pruner
    after every epoch but the last (as Ray's ASHA, which has no rung at ``max_t``)."""

    rank, world_size = 0, 1

    def __init__(self, trial, epochs: int):
        self.trial, self.epochs, self.rows = trial, epochs, []

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import optuna

        epoch = int(metrics["epoch"])
        self.rows.append({"trial": self.trial.number, "epoch": epoch, "rsum": metrics.get("rsum", math.nan)})
        self.trial.report(self.rows[-1]["rsum"], epoch)
        if epoch < self.epochs and self.trial.should_prune():
            raise optuna.TrialPruned()

    def latest_checkpoint(self):
        return contextlib.nullcontext(None)


def optuna_search(study):
    """The study's sampler, as ``study/tuner.py`` builds it, and ASHA as Optuna's own
    ``SuccessiveHalvingPruner`` with the study's grace period and reduction factor."""
    import optuna

    s = study.search
    if s.algorithm == "optuna-tpe":
        startup = {} if s.startup_trials is None else {"n_startup_trials": s.startup_trials}
        sampler = optuna.samplers.TPESampler(seed=s.seed, **startup)
    else:
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=s.grace_period,
                                                    reduction_factor=int(s.reduction_factor)) \
        if s.scheduler == "asha" else optuna.pruners.NopPruner()
    return optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)


def optuna_run(arm: str, seed: int, args: argparse.Namespace, data_root: Path) -> pd.DataFrame:
    """One search, in this process, trial after trial: the study's epochs of every trial in order.
    A trial that fails (e.g. a non-finite loss) keeps the epochs it reported and is told FAIL."""
    import optuna
    import torch

    from study.config import job_with_params
    from study.spaces import DefineByRun, resolve_space
    from trainables.loop import fit

    torch.set_num_threads(1)  # what a 1-CPU Ray worker gets
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = bench_study(arm, seed, args, data_root, data_root.parent)
    space, base = DefineByRun(resolve_space(study)), study.job().model_dump(mode="json")
    search, rows = optuna_search(study), []
    for _ in range(args.trials):
        trial = search.ask()
        space(trial)
        reporter = PruningReporter(trial, args.epochs)
        try:
            fit(job_with_params(base, trial.params), reporter, torch.device("cpu"))
            search.tell(trial, reporter.rows[-1]["rsum"])
        except optuna.TrialPruned:
            search.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except Exception as err:  # noqa: BLE001 - a failed trial is a result of the search, as in Tune
            print(f"{arm} seed {seed} trial {trial.number} failed: {type(err).__name__}: {err}", flush=True)
            search.tell(trial, state=optuna.trial.TrialState.FAIL)
        rows += reporter.rows
    return with_best_so_far(pd.DataFrame(rows))


def ray_run(arm: str, seed: int, args: argparse.Namespace, data_root: Path) -> pd.DataFrame:
    """One search through ``run_study`` (Ray Tune, ASHAScheduler, 2 concurrent trials, MLflow), as
    ``python -m study run`` searches; needs ``local_ray()`` around it."""
    from study.search import run_study

    return epoch_rows(run_study(bench_study(arm, seed, args, data_root, data_root.parent)).study_dir)


def run_all(args, out: Path) -> dict[tuple[str, int], pd.DataFrame]:
    """Every (arm, seed) search; the curves so far are saved after each one."""
    curves: dict[tuple[str, int], pd.DataFrame] = {}
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]

    def done(arm: str, seed: int, curve: pd.DataFrame, started: float) -> None:
        curves[arm, seed] = curve
        print(f"{arm} seed {seed}: best rSum {curve['best_rsum'].max():.1f} in {len(curve)} trial-epochs, "
              f"{time.perf_counter() - started:.0f} s since the start", flush=True)
        save_curves(curves, out / "search_curves.csv")

    with tempfile.TemporaryDirectory(prefix="itm-search-") as tmp_name:
        data_root = bench_data(Path(tmp_name) / "synth", args.train_images, args.val_images)
        warm_text_cache(bench_study(args.arms[0], 0, args, data_root, Path(tmp_name)))
        started = time.perf_counter()
        if args.engine == "ray":
            with local_ray():
                for arm, seed in jobs:
                    done(arm, seed, ray_run(arm, seed, args, data_root), started)
            return curves
        # Runs are independent: ``--workers`` of them at a time, each one trial after another.
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(optuna_run, arm, seed, args, data_root): (arm, seed) for arm, seed in jobs}
            for future in as_completed(futures):
                done(*futures[future], future.result(), started)
    return dict(sorted(curves.items(), key=lambda item: jobs.index(item[0])))


def save_curves(curves: dict[tuple[str, int], pd.DataFrame], path: Path) -> None:
    pd.concat([c.assign(arm=arm, seed=seed) for (arm, seed), c in curves.items()]).to_csv(path, index=False)


def load_curves(paths: list[str]) -> dict[tuple[str, int], pd.DataFrame]:
    """Curves saved by earlier runs (``search_curves.csv``), so tables can be rebuilt or runs merged."""
    curves: dict[tuple[str, int], pd.DataFrame] = {}
    for path in paths:
        frame = pd.read_csv(path)
        for (arm, seed), c in frame.groupby(["arm", "seed"], sort=False):
            curves[arm, int(seed)] = c.drop(columns=["arm", "seed"]).reset_index(drop=True)
    return curves


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------


def t_interval(values) -> tuple[float, float, float]:
    """Mean and its 95% t-interval over seeds (nan bounds with fewer than two values)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    if np.ptp(values) == 0:  # scipy returns nan for zero spread; the interval is the point
        return mean, mean, mean
    low, high = stats.t.interval(CONFIDENCE, len(values) - 1, loc=mean, scale=stats.sem(values))
    return mean, float(low), float(high)


def epochs_to_reach(curve: pd.DataFrame, target: float) -> int | None:
    """Trial-epochs spent when the best-so-far first reached ``target`` (None: never)."""
    reached = curve[curve["best_rsum"] >= target]
    return int(reached["trial_epochs"].iloc[0]) if len(reached) else None


def run_table(curves: dict[tuple[str, int], pd.DataFrame]) -> tuple[pd.DataFrame, float]:
    """One row per (arm, seed); the target is a share of the best rSum any run found."""
    target = TARGET_FRACTION * max(float(c["best_rsum"].max()) for c in curves.values())
    rows = []
    for (arm, seed), c in curves.items():
        reached = epochs_to_reach(c, target)
        rows.append({"arm": arm, "seed": seed, "trials": c["trial"].nunique(), "trial_epochs": len(c),
                     "best_rsum": float(c["best_rsum"].max()), "reached": reached is not None,
                     # never reached: all its trial-epochs were spent without it, a lower bound
                     "epochs_to_target": reached if reached is not None else len(c)})
    order = list(dict.fromkeys(arm for arm, _ in curves))  # the arms as given, ours first
    frame = pd.DataFrame(rows).sort_values(
        ["seed", "arm"], key=lambda col: col.map(order.index) if col.name == "arm" else col)
    return frame.reset_index(drop=True), target


def arm_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per arm: means over seeds with 95% t-intervals."""
    rows = []
    for arm, r in runs.groupby("arm", sort=False):
        best, best_lo, best_hi = t_interval(r["best_rsum"])
        spent, spent_lo, spent_hi = t_interval(r["trial_epochs"])
        to, to_lo, to_hi = t_interval(r["epochs_to_target"])
        rows.append({"arm": arm, "seeds": len(r), "best_rsum": best, "best_lo": best_lo, "best_hi": best_hi,
                     "trial_epochs": spent, "spent_lo": spent_lo, "spent_hi": spent_hi,
                     "reached": int(r["reached"].sum()), "epochs_to_target": to, "to_lo": to_lo,
                     "to_hi": to_hi})
    return pd.DataFrame(rows)


def seed_ratios(runs: pd.DataFrame, arm: str, baseline: str = BASELINE) -> pd.DataFrame:
    """Per seed, ``arm``'s trial-epochs to the target over ``baseline``'s and what is known of it:
    ``value`` (both reached the target), ``below`` (only ``arm`` did: the baseline's count is more
    than it spent, so the true ratio is below this one), ``above`` (only the baseline did), or
    ``unknown`` (neither did)."""
    ours, base = runs[runs["arm"] == arm].set_index("seed"), runs[runs["arm"] == baseline].set_index("seed")
    kinds = {(True, True): "value", (True, False): "below", (False, True): "above", (False, False): "unknown"}
    to = "epochs_to_target"
    return pd.DataFrame([{"seed": seed, "ratio": ours.at[seed, to] / base.at[seed, to],
                          "known": kinds[bool(ours.at[seed, "reached"]), bool(base.at[seed, "reached"])],
                          "best_diff": ours.at[seed, "best_rsum"] - base.at[seed, "best_rsum"]}
                         for seed in ours.index.intersection(base.index)])


def seed_verdict(ratio: float, known: str) -> str:
    """Whether one seed meets the issue's target (ratio <= 1/3), as far as censoring lets us say."""
    if known == "value":
        return "met" if ratio <= TARGET_RATIO else "not met"
    if known == "below" and ratio <= TARGET_RATIO:
        return "met"
    if known == "above" and ratio > TARGET_RATIO:
        return "not met"
    return "undecided"


def comparison(runs: pd.DataFrame, arm: str, baseline: str = BASELINE) -> dict:
    """``arm`` against ``baseline`` on the same seeds: the ratio of trial-epochs to the target
    (geometric mean and the 95% t-interval of the mean log-ratio, over the seeds where both reached
    it), the seeds meeting the target ratio, and the paired difference in best rSum (t-interval)."""
    seeds = seed_ratios(runs, arm, baseline)
    if seeds.empty:
        return {}
    valued = seeds[seeds["known"] == "value"]
    ratio = tuple(map(math.exp, t_interval(np.log(valued["ratio"])))) if len(valued) else (math.nan,) * 3
    verdicts = [seed_verdict(r.ratio, r.known) for r in seeds.itertuples()]
    return {"arm": arm, "seeds": seeds, "ratio": ratio, "valued": len(valued),
            "verdicts": {v: verdicts.count(v) for v in ("met", "not met", "undecided")},
            "best_diff": t_interval(seeds["best_diff"]),
            "better": int((seeds["best_diff"] > 0).sum()), "worse": int((seeds["best_diff"] < 0).sum())}


def per_seed_text(seeds: pd.DataFrame) -> str:
    signs = {"value": "", "below": "< ", "above": "> "}
    return ", ".join(f"{r.seed}: {signs[r.known]}{r.ratio:.2f}" if r.known in signs else f"{r.seed}: —"
                     for r in seeds.itertuples())


# --------------------------------------------------------------------------------------------------
# Plot and tables
# --------------------------------------------------------------------------------------------------


def best_so_far_grid(curves: dict[tuple[str, int], pd.DataFrame], arm: str, length: int) -> np.ndarray:
    """[seeds, length]: the arm's best rSum after 1..length trial-epochs per seed; a finished run
    keeps its final best (its search is over)."""
    rows = []
    for (a, _), c in sorted(curves.items()):
        if a == arm:
            values = c["best_rsum"].to_numpy(dtype=float)
            rows.append(np.concatenate([values, np.full(max(0, length - len(values)), values[-1])])[:length])
    return np.array(rows)


def plot(curves: dict[tuple[str, int], pd.DataFrame], target: float, runs: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(arm for arm, _ in curves))
    colours = dict(zip(arms, plt.get_cmap("tab10").colors))
    length = max(len(c) for c in curves.values())
    x = np.arange(1, length + 1)
    fig, (mean_ax, runs_ax) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for arm in arms:
        grid = best_so_far_grid(curves, arm, length)
        mean = grid.mean(axis=0)
        mean_ax.plot(x, mean, color=colours[arm], label=f"{arm} ({len(grid)} seeds)")
        if len(grid) > 1:
            half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(grid) - 1) * stats.sem(grid, axis=0)
            mean_ax.fill_between(x, mean - half, mean + half, color=colours[arm], alpha=0.2, linewidth=0)
        spent = runs.loc[runs["arm"] == arm, "trial_epochs"].mean()
        mean_ax.axvline(spent, color=colours[arm], linestyle=":", linewidth=1)
        for (a, _), c in curves.items():
            if a == arm:
                runs_ax.step(c["trial_epochs"], c["best_rsum"], where="post", color=colours[arm], alpha=0.7,
                             linewidth=1)
    for ax in (mean_ax, runs_ax):
        ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("cumulative trial-epochs")
    mean_ax.set_ylabel("best validation rSum so far")
    mean_ax.set_title(f"mean over seeds, {CONFIDENCE:.0%} t-band; dotted: mean trial-epochs spent")
    runs_ax.set_title(f"every run; dashed: target = {TARGET_FRACTION:.0%} of the best found ({target:.1f})")
    mean_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Best validation rSum so far against search cost: {int(runs['trials'].max())} trials a run "
                 "(DIAS, frozen MiniLM, synthetic benchmark)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def interval(mean: float, low: float, high: float, digits: int = 1) -> str:
    if math.isnan(low):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown(runs: pd.DataFrame, arms: pd.DataFrame, comparisons: list[dict], target: float) -> str:
    lines = [f"Target: {TARGET_FRACTION:.0%} of the best validation rSum any run found = {target:.1f}. "
             f"Means over seeds with {CONFIDENCE:.0%} t-intervals; \"≥\": some run never reached the "
             "target and counts with all its trial-epochs.", "",
             "| arm | seeds | best rSum | trial-epochs spent | runs reaching the target "
             "| trial-epochs to the target |",
             "|---|---|---|---|---|---|"]
    for r in arms.itertuples():
        bound = "≥ " if r.reached < r.seeds else ""
        lines.append(f"| {r.arm} | {r.seeds} | {interval(r.best_rsum, r.best_lo, r.best_hi)} | "
                     f"{interval(r.trial_epochs, r.spent_lo, r.spent_hi)} | {r.reached}/{r.seeds} | "
                     f"{bound}{interval(r.epochs_to_target, r.to_lo, r.to_hi)} |")
    lines += ["", f"Against {BASELINE} on the same seed. Ratio: trial-epochs to the target over "
              f"{BASELINE}'s; per seed \"<\" / \">\" where only one of the two reached the target "
              "(a bound), \"—\" where neither did; the geometric mean and its 95% t-interval use the seeds "
              f"where both reached it. The issue's target is a ratio ≤ {TARGET_RATIO:.2f} for {OURS}.", "",
              "| arm | ratio per seed | ratio, seeds where both reached "
              "| seeds meeting ≤ 1/3: met / not met / undecided "
              f"| best rSum − {BASELINE}'s (paired) | seeds better / worse |",
              "|---|---|---|---|---|---|"]
    for c in comparisons:
        v, (d, d_lo, d_hi) = c["verdicts"], c["best_diff"]
        n = c["valued"]
        ratio = "—" if not n else f"{interval(*c['ratio'], 2)} ({n} seed{'s' * (n > 1)})"
        lines.append(f"| {c['arm']} | {per_seed_text(c['seeds'])} | {ratio} | {v['met']} / {v['not met']} / "
                     f"{v['undecided']} | {interval(d, d_lo, d_hi)} | {c['better']} / {c['worse']} |")
    lines += ["", "| seed | arm | trials | trial-epochs | best rSum | trial-epochs to the target |",
              "|---|---|---|---|---|---|"]
    for r in runs.itertuples():
        to = str(r.epochs_to_target) if r.reached else f"not reached ({r.epochs_to_target} spent)"
        lines.append(f"| {r.seed} | {r.arm} | {r.trials} | {r.trial_epochs} | {r.best_rsum:.1f} | {to} |")
    return "\n".join(lines) + "\n"


def summarise(curves: dict[tuple[str, int], pd.DataFrame], out: Path, cmd: str,
              record_to: str | None) -> None:
    runs, target = run_table(curves)
    arms = arm_table(runs)
    comparisons = [c for arm in arms["arm"] if arm != BASELINE if (c := comparison(runs, arm))]
    runs.to_csv(out / "search_efficiency.csv", index=False)
    text = markdown(runs, arms, comparisons, target)
    (out / "search_efficiency.md").write_text(text)
    plot(curves, target, runs, out / "search_efficiency.png")
    print(text)
    print(f"wrote {out}/search_efficiency.{{csv,md,png}}")
    trials = int(runs["trials"].max())
    for r in arms.itertuples():
        record(record_to, f"search, {r.arm}, {trials} trials x {r.seeds} seeds: mean best val rSum; mean "
               f"trial-epochs spent; trial-epochs to {target:.1f} ({TARGET_FRACTION:.0%} of the best found)",
               f"{interval(r.best_rsum, r.best_lo, r.best_hi)}; "
               f"{interval(r.trial_epochs, r.spent_lo, r.spent_hi)}; "
               f"{'≥ ' if r.reached < r.seeds else ''}{interval(r.epochs_to_target, r.to_lo, r.to_hi)} "
               f"(reached in {r.reached}/{r.seeds})", cmd)
    for c in comparisons:
        v = c["verdicts"]
        record(record_to, f"search, {c['arm']} / {BASELINE}, same seed: trial-epochs to the target per seed; "
               f"seeds meeting <= 1/3 (met / not met / undecided); best rSum difference",
               f"{per_seed_text(c['seeds'])}; {v['met']} / {v['not met']} / {v['undecided']}; "
               f"{interval(*c['best_diff'])}", cmd)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=48, help="trial budget of each run")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated search seeds")
    parser.add_argument("--arms", default="tpe+asha,random+fifo,random+asha",
                        help="comma-separated: " + ", ".join(ARMS))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--pooling", default="mean", help="model.pooling (the study file has gpo)")
    parser.add_argument("--train-images", type=int, default=150)
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--text-encoder", default="minilm",
                        help="minilm (frozen, cached) or tiny (random, trained: the old benchmark's)")
    parser.add_argument("--engine", choices=("optuna", "ray"), default="optuna",
                        help="optuna: each search in-process with Optuna's pruner (the design); "
                             "ray: through run_study, Ray Tune's ASHAScheduler, 2 concurrent trials")
    parser.add_argument("--workers", type=int, default=2, help="searches run at a time (optuna engine)")
    parser.add_argument("--from-curves", default=None,
                        help="comma-separated search_curves.csv files: summarise (and merge), run nothing")
    parser.add_argument("--out", default=str(OUT_DIR), help="where the csv/md/png go")
    parser.add_argument("--record", default=None, help="append the figures (JSON lines) to this file")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.arms = args.arms.split(",")
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    quiet_env()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = load_curves(args.from_curves.split(",")) if args.from_curves else run_all(args, out)
    summarise(curves, out, command("benchmarks.search_efficiency", argv), args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
