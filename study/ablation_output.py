"""An ablation's outputs: the per-trial ``results.csv`` and the table in Markdown, LaTeX and CSV.

``write_tables`` only reads ``results.csv`` + ``ablation.json``, so ``study report`` rebuilds the
same files from a finished or interrupted ablation without retraining.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from study.results import _trial_id
from study.table_render import to_latex, to_markdown
from study.tables import METRICS, blocks_of, caption, summarise, tidy

ABLATION_FILE = "ablation.json"  # rows, seeds, dataset and --from-study source: what the table needs
TABLE_STEM = "ablation"
GAP_METRICS = ("gap_centroid_dist", "alignment", "uniformity_img", "uniformity_txt")
PREFIXES = ("", "test_", "test_1k_")


def kept(key: str) -> bool:
    """Retrieval metrics on every split, the modality-gap diagnostics and the loss."""
    return key == "loss" or any(key in (p + m for m in METRICS + GAP_METRICS) for p in PREFIXES)


def trial_table(grid, jobs: dict[str, dict], epochs: int) -> pd.DataFrame:
    """One row per trial: id, row, seed, the row's method, status and the final-epoch metrics."""
    rows = []
    for result in grid:
        metrics, config = result.metrics or {}, result.config or {}
        trial_id = metrics.get("trial_id") or _trial_id(result.path)
        variant = config.get("variant")
        row = {"trial_id": trial_id, "variant": variant, "seed": config.get("seed"),
               "method": jobs.get(variant, {}).get("method", ""),
               "status": status_of(result, epochs), "epochs": metrics.get("training_iteration", 0)}
        row.update({key: value for key, value in metrics.items() if kept(key)})
        row["error"] = str(result.error).strip().splitlines()[-1][:300] if result.error is not None else ""
        rows.append(row)
    table = pd.DataFrame(rows)
    if "seed" in table:  # a trial that never started has no config: keep the column integer
        table["seed"] = table["seed"].astype("Int64")
    return table


def status_of(result, epochs: int) -> str:
    """FIFO grid, no early stopping: anything short of the last epoch without an error was interrupted."""
    if result.error is not None:
        return "failed"
    done = int((result.metrics or {}).get("training_iteration", 0))
    return "completed" if done >= epochs else "interrupted"


def is_finished(trials: pd.DataFrame, expected: int) -> bool:
    return len(trials) >= expected and not (trials["status"] == "interrupted").any()


def write_meta(plan, ablation_dir: Path) -> Path:
    study = plan.study
    meta = {"name": plan.name, "study": study.name, "method": study.method, "dataset": Path(study.data.root).name,
            "rows": [r.name for r in plan.rows], "seeds": list(plan.seeds), "epochs": study.train.epochs,
            "source": plan.source}
    path = ablation_dir / ABLATION_FILE
    path.write_text(json.dumps(meta, indent=2, default=str))
    return path


def read_meta(ablation_dir: Path) -> dict:
    return json.loads((Path(ablation_dir) / ABLATION_FILE).read_text())


def write_tables(trials: pd.DataFrame, meta: dict, out_dir: Path) -> tuple[str, list[Path]]:
    """``ablation.md``, ``ablation.tex``, ``ablation.csv`` in ``out_dir``; returns the Markdown."""
    order = meta["rows"]
    blocks = blocks_of(trials)
    summaries = {block: summarise(trials, order, block) for block in blocks}
    text = caption(meta["method"], meta["dataset"], meta["seeds"], blocks, order, summaries)
    source = meta.get("source")
    if source:
        text += f" Hyperparameters: best trial {source['trial_id']} of {Path(source['from_study']).name}."
    markdown = to_markdown(summaries, text)
    files = [out_dir / f"{TABLE_STEM}.{ext}" for ext in ("md", "tex", "csv")]
    files[0].write_text(markdown)
    files[1].write_text(to_latex(summaries, text, label=f"tab:{meta['name']}"))
    tidy(summaries).to_csv(files[2], index=False, float_format="%.4f")
    return markdown, files
