"""Search efficiency: Optuna TPE + ASHA vs random search + FIFO at the same trial budget.

    python -m benchmarks.search_efficiency --trials 24            # the issue's two arms, seeds 0,1,2
    python -m benchmarks.search_efficiency --trials 6 --seeds 0   # a smaller run
    python -m benchmarks.search_efficiency --trials 24 --arms tpe+asha,random+fifo,tpe+fifo,random+asha

Every arm (``--arms``: sampler + scheduler; the default pair is the issue's comparison, the other
two separate TPE's share from ASHA's) runs ``studies/demo-search.yaml`` (DIAS, its default search space, tiny text encoder, d 64)
shrunk to the smoke size (``data.max_images=150``, 3 epochs) on a synthetic benchmark written to a
temp dir, through ``run_study`` on a local 2-CPU Ray, with ``search.seed`` = each seed. For every run
the epochs reported by all its trials are put in time order; after each one, the best validation
rSum so far is recorded against the cumulative number of trial-epochs spent (the search cost: an
ASHA-stopped trial costs only the epochs it ran). Reported per run: best rSum, trial-epochs spent,
and trial-epochs until the best-so-far reached 95% of the best rSum seen in any run of this
invocation, and 95% of the best of that seed's runs. Writes
``benchmarks/out/search_efficiency.{csv,md,png}`` and the curves as ``search_curves.csv``.

Note: Optuna's ``TPESampler`` samples its first ``n_startup_trials`` (10) trials at random, so with a
budget under ~12 trials both arms draw mostly random configurations and the comparison mostly
measures ASHA's early stopping; ``--tpe-startup N`` sets ``search.startup_trials`` of the TPE arms.
With the same ``search.seed`` the random start-up trials of TPE and the random sampler's trials are
the same configurations, so the arms differ only where TPE starts modelling (a paired design).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

from benchmarks._common import OUT_DIR, ROOT, command, local_ray, quiet_env, record, synth_dataset

ARMS = {"tpe+asha": ("optuna-tpe", "asha"), "random+fifo": ("random", "fifo"),
        "tpe+fifo": ("optuna-tpe", "fifo"), "random+asha": ("random", "asha")}
BASELINE = "random+fifo"


def arm_label(arm: str, tpe_startup: int | None) -> str:
    """``tpe+asha`` -> ``tpe(5)+asha`` when TPE's random start-up is not Optuna's default."""
    return arm.replace("tpe", f"tpe({tpe_startup})") if tpe_startup and arm.startswith("tpe") else arm


def run_arm(arm: str, seed: int, trials: int, epochs: int, max_images: int, data_root: Path, tmp: Path,
            tpe_startup: int | None = None) -> Path:
    """One study; returns its directory."""
    from study.config import load_study
    from study.search import run_study

    algorithm, scheduler = ARMS[arm]
    extra = [f"search.startup_trials={tpe_startup}"] if tpe_startup and algorithm == "optuna-tpe" else []
    study = load_study(ROOT / "studies" / "demo-search.yaml", [*extra,
        f"name=bench-search-{arm.replace('+', '-')}-s{seed}", f"data.root={data_root}",
        f"search.space={ROOT / 'search_spaces' / 'dias.yaml'}",
        f"data.max_images={max_images}", f"train.epochs={epochs}", f"search.num_samples={trials}",
        f"search.algorithm={algorithm}", f"search.scheduler={scheduler}", f"search.seed={seed}",
        f"storage.path={tmp / 'results'}", f"tracking.uri=sqlite:///{tmp / 'mlruns.db'}"])
    return run_study(study).study_dir


def epoch_rows(study_dir: Path) -> pd.DataFrame:
    """Every epoch reported by every trial of a study: trial, epoch, rsum, timestamp, in time order."""
    rows = []
    for path in sorted(study_dir.glob("trial_*/result.json")):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows.append({"trial": path.parent.name, "epoch": r["training_iteration"], "rsum": r.get("rsum"),
                             "timestamp": r["timestamp"], "time_total_s": r["time_total_s"]})
    frame = pd.DataFrame(rows).sort_values(["timestamp", "time_total_s"]).reset_index(drop=True)
    frame["trial_epochs"] = range(1, len(frame) + 1)
    frame["best_rsum"] = frame["rsum"].cummax()
    return frame


def epochs_to_reach(curve: pd.DataFrame, target: float) -> int | None:
    reached = curve[curve["best_rsum"] >= target]
    return int(reached["trial_epochs"].iloc[0]) if len(reached) else None


def summarise(curves: dict[tuple[str, int], pd.DataFrame]) -> tuple[pd.DataFrame, float]:
    """One row per run, and the best rSum known across all runs."""
    best_known = max(float(c["best_rsum"].max()) for c in curves.values())
    seed_best = {}
    for (_, seed), c in curves.items():
        seed_best[seed] = max(seed_best.get(seed, float("-inf")), float(c["best_rsum"].max()))
    # The baseline's final best on each seed: how soon does each arm find a trial that good?
    baseline_best = {seed: float(c["best_rsum"].max()) for (arm, seed), c in curves.items() if arm == BASELINE}
    rows = [{"arm": arm, "seed": seed, "trials": c["trial"].nunique(), "trial_epochs": len(c),
             "best_rsum": float(c["best_rsum"].max()),
             "epochs_to_95pct": epochs_to_reach(c, 0.95 * best_known),
             "epochs_to_95pct_seed": epochs_to_reach(c, 0.95 * seed_best[seed]),
             "epochs_to_baseline_best": (epochs_to_reach(c, baseline_best[seed]) if seed in baseline_best
                                         else None)}
            for (arm, seed), c in curves.items()]
    return pd.DataFrame(rows).sort_values("seed", kind="stable").reset_index(drop=True), best_known


def plot(curves: dict[tuple[str, int], pd.DataFrame], best_known: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({seed for _, seed in curves})
    arms = list(dict.fromkeys(arm for arm, _ in curves))
    colours = dict(zip(arms, plt.get_cmap("tab10").colors))
    cols = min(3, len(seeds))
    rows = -(-len(seeds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(seeds):]:
        ax.set_visible(False)
    for ax, seed in zip(axes.flat, seeds):
        for arm in arms:
            c = curves.get((arm, seed))
            if c is not None:
                ax.step(c["trial_epochs"], c["best_rsum"], where="post", color=colours[arm], label=arm)
        ax.axhline(0.95 * best_known, color="grey", linestyle="--", linewidth=1, label="95% of best known")
        ax.set_title(f"search seed {seed}")
        ax.set_xlabel("cumulative trial-epochs")
    for row in axes:
        row[0].set_ylabel("best validation rSum so far")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle("Search efficiency on the synthetic benchmark (DIAS, tiny encoder)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def arm_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per arm: means over seeds, and trial-epochs to 95% of the best known relative to
    the baseline arm on the same seed (seeds where both reached it)."""
    base = table[table["arm"] == BASELINE].set_index("seed")["epochs_to_95pct"]
    rows = []
    for arm, runs in table.groupby("arm", sort=False):
        reached = runs["epochs_to_95pct"].dropna()
        paired = runs.set_index("seed")["epochs_to_95pct"].div(base).dropna()
        to_base = runs["epochs_to_baseline_best"].dropna()
        base_match = table[table["arm"] == BASELINE].set_index("seed")["epochs_to_baseline_best"]
        match_ratio = runs.set_index("seed")["epochs_to_baseline_best"].div(base_match).dropna()
        rows.append({"arm": arm, "runs": len(runs), "best_rsum": runs["best_rsum"].mean(),
                     "trial_epochs": runs["trial_epochs"].mean(), "reached": len(reached),
                     "epochs_to_95pct": reached.mean() if len(reached) else float("nan"),
                     "vs_baseline": paired.mean() if len(paired) else float("nan"), "paired_seeds": len(paired),
                     "matched_baseline": len(to_base),
                     "epochs_to_baseline_best": to_base.mean() if len(to_base) else float("nan"),
                     "vs_baseline_match": match_ratio.mean() if len(match_ratio) else float("nan")})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, summary: pd.DataFrame, best_known: float) -> str:
    def reached(value) -> str:
        return "not reached" if pd.isna(value) else str(int(value))

    header = ("| arm | seed | trials | trial-epochs | best rSum | trial-epochs to 95% of best known "
              f"| trial-epochs to 95% of the seed's best | trial-epochs to {BASELINE}'s best |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.arm} | {r.seed} | {r.trials} | {r.trial_epochs} | {r.best_rsum:.1f} | "
                     f"{reached(r.epochs_to_95pct)} | {reached(r.epochs_to_95pct_seed)} | "
                     f"{reached(r.epochs_to_baseline_best)} |")
    def ratio(value: float, seeds: int) -> str:
        return "—" if pd.isna(value) else f"{value:.2f} ({seeds} seed{'s' * (seeds != 1)})"

    def mean(value: float) -> str:
        return "—" if pd.isna(value) else f"{value:.1f}"

    arm_header = ("| arm | mean best rSum | mean trial-epochs spent | runs reaching 95% of best known "
                  f"| mean trial-epochs to it | / {BASELINE}'s, same seed | runs matching {BASELINE}'s best "
                  f"| mean trial-epochs to it | / {BASELINE}'s, same seed |")
    lines += ["", f"Best rSum known across these runs: {best_known:.1f} (95%: {0.95 * best_known:.1f}).", "",
              arm_header, "|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.arm} | {r.best_rsum:.1f} | {r.trial_epochs:.1f} | {r.reached}/{r.runs} "
                     f"| {mean(r.epochs_to_95pct)} | {ratio(r.vs_baseline, r.paired_seeds)} "
                     f"| {r.matched_baseline}/{r.runs} | {mean(r.epochs_to_baseline_best)} "
                     f"| {ratio(r.vs_baseline_match, r.matched_baseline)} |")
    return "\n".join(lines) + "\n"


def load_curves(paths: list[str]) -> dict[tuple[str, int], pd.DataFrame]:
    """Curves saved by earlier runs (``search_curves.csv``), so tables can be rebuilt or runs merged."""
    curves: dict[tuple[str, int], pd.DataFrame] = {}
    for path in paths:
        frame = pd.read_csv(path)
        for (arm, seed), c in frame.groupby(["arm", "seed"], sort=False):
            curves[arm, int(seed)] = c.drop(columns=["arm", "seed"]).reset_index(drop=True)
    return curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trial budget of each run")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated search seeds")
    parser.add_argument("--arms", default="tpe+asha,random+fifo", help="comma-separated: " + ", ".join(ARMS))
    parser.add_argument("--tpe-startup", type=int, default=None,
                        help="search.startup_trials of the TPE arms (default: Optuna's 10)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-images", type=int, default=150)
    parser.add_argument("--from-curves", default=None,
                        help="comma-separated search_curves.csv files: summarise (and merge) them, run nothing")
    parser.add_argument("--out", default=str(OUT_DIR), help="where the csv/md/png go")
    parser.add_argument("--record", default=None, help="append the figures (JSON lines) to this file")
    args = parser.parse_args(argv)
    quiet_env()
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.from_curves:
        curves = load_curves(args.from_curves.split(","))
    else:
        curves = {}
        with tempfile.TemporaryDirectory(prefix="itm-search-") as tmp_name, local_ray():
            tmp = Path(tmp_name)
            data_root = synth_dataset(tmp / "synth", 4 * args.max_images)  # dev = images // 4 >= max_images
            for seed in seeds:
                for arm in arms:
                    label = arm_label(arm, args.tpe_startup)
                    curves[label, seed] = epoch_rows(run_arm(arm, seed, args.trials, args.epochs, args.max_images,
                                                             data_root, tmp, args.tpe_startup))
        pd.concat([c.assign(arm=arm, seed=seed) for (arm, seed), c in curves.items()]).to_csv(
            out / "search_curves.csv", index=False)
    table, best_known = summarise(curves)
    summary = arm_summary(table)
    table.to_csv(out / "search_efficiency.csv", index=False)
    text = markdown(table, summary, best_known)
    (out / "search_efficiency.md").write_text(text)
    plot(curves, best_known, out / "search_efficiency.png")
    print(text)
    print(f"wrote {out}/search_efficiency.{{csv,md,png}}")

    cmd = command("benchmarks.search_efficiency", argv)
    n_seeds = table["seed"].nunique()
    for r in summary.itertuples():
        ratio = "" if pd.isna(r.vs_baseline) else f"; {r.vs_baseline:.2f}x {BASELINE}'s on the same seed"
        if not pd.isna(r.vs_baseline_match):
            ratio += (f"; {BASELINE}'s final best matched in {r.matched_baseline}/{r.runs} runs after "
                      f"{r.vs_baseline_match:.2f}x its trial-epochs")
        record(args.record, f"search, {r.arm}, {int(table['trials'].max())} trials x {n_seeds} seeds: mean best "
               "rSum; mean trial-epochs spent; trial-epochs to 95% of the best known rSum",
               f"{r.best_rsum:.1f}; {r.trial_epochs:.1f}; "
               f"{'not reached' if pd.isna(r.epochs_to_95pct) else f'{r.epochs_to_95pct:.1f}'} "
               f"(reached in {r.reached}/{r.runs} runs{ratio})", cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
