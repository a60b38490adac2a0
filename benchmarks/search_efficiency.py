"""Search efficiency: Optuna TPE + ASHA vs random search + FIFO at the same trial budget.

    python -m benchmarks.search_efficiency                        # 8 trials, seeds 0,1,2
    python -m benchmarks.search_efficiency --trials 6 --seeds 0   # a smaller run

Both arms run ``studies/demo-search.yaml`` (DIAS, its default search space, tiny text encoder, d 64)
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
measures ASHA's early stopping.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

from benchmarks._common import OUT_DIR, ROOT, command, local_ray, quiet_env, record, synth_dataset

ARMS = {"tpe+asha": ("optuna-tpe", "asha"), "random+fifo": ("random", "fifo")}


def run_arm(arm: str, seed: int, trials: int, epochs: int, max_images: int, data_root: Path, tmp: Path) -> Path:
    """One study; returns its directory."""
    from study.config import load_study
    from study.engine import run_study

    algorithm, scheduler = ARMS[arm]
    study = load_study(ROOT / "studies" / "demo-search.yaml", [
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
    rows = [{"arm": arm, "seed": seed, "trials": c["trial"].nunique(), "trial_epochs": len(c),
             "best_rsum": float(c["best_rsum"].max()),
             "epochs_to_95pct": epochs_to_reach(c, 0.95 * best_known),
             "epochs_to_95pct_seed": epochs_to_reach(c, 0.95 * seed_best[seed])}
            for (arm, seed), c in curves.items()]
    return pd.DataFrame(rows), best_known


def plot(curves: dict[tuple[str, int], pd.DataFrame], best_known: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {"tpe+asha": "tab:blue", "random+fifo": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    seeds = sorted({seed for _, seed in curves})
    for (arm, seed), c in curves.items():
        ax.step(c["trial_epochs"], c["best_rsum"], where="post", color=colours[arm], alpha=0.8,
                linestyle=styles[seeds.index(seed) % len(styles)], label=f"{arm} seed {seed}")
    ax.axhline(0.95 * best_known, color="grey", linestyle="--", linewidth=1, label="95% of best known")
    ax.set_xlabel("cumulative trial-epochs")
    ax.set_ylabel("best validation rSum so far")
    ax.set_title("Search efficiency on the synthetic benchmark (DIAS, tiny encoder)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(table: pd.DataFrame) -> str:
    def reached(value) -> str:
        return "not reached" if pd.isna(value) else str(int(value))

    header = ("| arm | seed | trials | trial-epochs | best rSum | trial-epochs to 95% of best known "
              "| trial-epochs to 95% of the seed's best |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.arm} | {r.seed} | {r.trials} | {r.trial_epochs} | {r.best_rsum:.1f} | "
                     f"{reached(r.epochs_to_95pct)} | {reached(r.epochs_to_95pct_seed)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trial budget of each run")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated search seeds")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-images", type=int, default=150)
    parser.add_argument("--out", default=str(OUT_DIR), help="where the csv/md/png go")
    parser.add_argument("--record", default=None, help="append the figures (JSON lines) to this file")
    args = parser.parse_args(argv)
    quiet_env()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    curves: dict[tuple[str, int], pd.DataFrame] = {}
    with tempfile.TemporaryDirectory(prefix="itm-search-") as tmp_name, local_ray():
        tmp = Path(tmp_name)
        data_root = synth_dataset(tmp / "synth", 4 * args.max_images)  # dev = images // 4 >= max_images
        for seed in seeds:
            for arm in ARMS:
                curves[arm, seed] = epoch_rows(run_arm(arm, seed, args.trials, args.epochs, args.max_images,
                                                       data_root, tmp))
    table, best_known = summarise(curves)
    table.to_csv(out / "search_efficiency.csv", index=False)
    pd.concat([c.assign(arm=arm, seed=seed) for (arm, seed), c in curves.items()]).to_csv(
        out / "search_curves.csv", index=False)
    (out / "search_efficiency.md").write_text(markdown(table))
    plot(curves, best_known, out / "search_efficiency.png")
    print(markdown(table))
    print(f"best rSum known across runs: {best_known:.1f}; wrote {out}/search_efficiency.{{csv,md,png}}")

    cmd = command("benchmarks.search_efficiency", argv)
    for arm in ARMS:
        rows = table[table["arm"] == arm]
        reached = rows["epochs_to_95pct_seed"].dropna()
        record(args.record, f"search, {arm}, {args.trials} trials x {len(seeds)} seeds: mean best rSum; "
               "mean trial-epochs spent; trial-epochs to 95% of the seed's best",
               f"{rows['best_rsum'].mean():.1f}; {rows['trial_epochs'].mean():.1f}; "
               f"{reached.mean() if len(reached) else float('nan'):.1f} (mean, reached in "
               f"{len(reached)}/{len(rows)} runs)", cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
