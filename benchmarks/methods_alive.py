"""Are the methods alive? Full DIAS and full CDDS against the base model, at searched settings.

    python -m benchmarks.methods_alive                 # about 20 minutes on 2 cores
    python -m benchmarks.methods_alive --methods dias --trials 6 --seeds 0,1,2

On the embedded benchmark with a large modality gap (``data synth --gap``), for each method:

1. a search study (the method's default space, TPE + ASHA, ``--trials`` trials) picks its values;
2. an ablation at those values (``ablate --from-study``) trains ``full`` and ``base`` with the same
   seeds (``--seeds``): ``base`` gets the same searched shared values (lr, ...) but none of the method's;
3. the test rSum of full − base per seed, its mean, a paired t-test (seeds are shared) and the 95 %
   confidence interval of the mean difference (scipy), and each term's budget share in the full row.

It reports what it measures, whichever way it goes. Writes ``benchmarks/out/methods_alive.md``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
from scipy import stats

from benchmarks._common import OUT_DIR, ROOT, command, local_ray, quiet_env, record
from study.ablation.render import markdown_table


def base_overrides(args, data_root: Path, tmp: Path) -> list[str]:
    return [f"data.root={data_root}", f"data.max_images={args.images}", f"train.epochs={args.epochs}",
            f"storage.path={tmp / 'results'}", f"tracking.uri=sqlite:///{tmp / 'mlruns.db'}",
            "resources.max_concurrent_trials=2"]


def search_then_ablate(method: str, args, data_root: Path, tmp: Path) -> tuple[pd.DataFrame, dict]:
    """The ablation's per-trial table (rows full, base and ``--rows``) and the searched values it used."""
    from study.ablation.output import read_meta
    from study.ablation.run import run_ablation
    from study.config import load_study
    from study.search import run_study

    common = base_overrides(args, data_root, tmp)
    search = load_study(ROOT / "studies" / "smoke.yaml", [*common, f"name=alive-{method}", f"method={method}",
                                                          f"search.num_samples={args.trials}", "search.scheduler=asha",
                                                          f"search.seed={args.search_seed}"])
    run_study(search)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = ["full", *[r for r in args.rows.split(",") if r], "base"]
    ablation = load_study(ROOT / "studies" / "smoke.yaml", [*common, f"name=alive-{method}", f"method={method}",
                                                            f"ablation.variants={rows}", f"ablation.seeds={seeds}"])
    outcome = run_ablation(ablation, from_study=f"alive-{method}")
    print(outcome.markdown, flush=True)
    return outcome.trials, read_meta(outcome.ablation_dir)["source"]["values"]


def compare(method: str, trials: pd.DataFrame, values: dict) -> dict:
    done = trials[trials["status"] == "completed"]
    wide = done.pivot(index="seed", columns="variant", values="test_rsum").dropna()
    diff = (wide["full"] - wide["base"]).to_numpy(float)
    n = len(diff)
    mean = float(diff.mean()) if n else float("nan")
    if n >= 2:
        test = stats.ttest_rel(wide["full"], wide["base"])
        low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=stats.sem(diff)) if diff.std() > 0 else (mean, mean)
        p = float(test.pvalue)
    else:
        low = high = p = float("nan")
    budget = done[done["variant"] == "full"].filter(like="budget/").mean().dropna()  # the base row's terms are NaN here
    return {"method": method, "seeds": n, "full rSum": f"{wide['full'].mean():.1f} ± {wide['full'].std():.1f}",
            "base rSum": f"{wide['base'].mean():.1f} ± {wide['base'].std():.1f}",
            "Δ (full − base)": f"{mean:+.1f}", "95 % CI of Δ": f"[{low:+.1f}, {high:+.1f}]",
            "paired t p": f"{p:.3g}", "per-seed Δ": ", ".join(f"{d:+.1f}" for d in diff),
            "full row's budget": ", ".join(f"{k.removeprefix('budget/')} {100 * v:.1f} %" for k, v in budget.items()),
            "searched values": ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else
                                         f"{k.split('.')[-1]}={v}" for k, v in values.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="dias,cdds")
    parser.add_argument("--gap", type=float, default=3.0, help="modality-gap offset of the synthetic data")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8, help="search trials per method")
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--seeds", default="0,1,2", help="ablation seeds, shared by full and base")
    parser.add_argument("--rows", default="", help="more ablation rows between full and base, e.g. 'w/o L_dim,w/o spatial'")
    parser.add_argument("--record", default=None)
    args = parser.parse_args(argv)
    quiet_env()
    cmd = command("benchmarks.methods_alive", argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="alive-") as tmp, local_ray():
        from trainables.data import write_synth

        data = Path(tmp) / "synth-gap"
        write_synth(data, images=max(args.images, 400), seed=0, gap=args.gap)
        for method in args.methods.split(","):
            rows.append(compare(method, *search_then_ablate(method, args, data, Path(tmp))))
            print(rows[-1], flush=True)
    table = markdown_table(pd.DataFrame(rows))
    text = (f"Test rSum, full vs base at searched values (synthetic, gap {args.gap}, {args.images} images, "
            f"{args.epochs} epochs, {args.trials} search trials). Command: `{cmd}`\n\n{table}\n")
    print("\n" + text)
    OUT_DIR.mkdir(exist_ok=True)
    (OUT_DIR / "methods_alive.md").write_text(text)
    for row in rows:
        record(args.record, f"{row['method']} full − base test rSum (95 % CI, paired p)",
               f"{row['Δ (full − base)']} {row['95 % CI of Δ']}, p {row['paired t p']}", cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
