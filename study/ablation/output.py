"""An ablation's outputs: ``ablation.json`` and the table in Markdown, LaTeX and CSV.

``write_tables`` only reads ``results.csv`` + ``ablation.json``, so ``study report`` rebuilds the
same files from a finished or interrupted ablation without retraining.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from study.ablation.render import to_latex, to_markdown
from study.ablation.stats import FINAL, blocks_of, caption, summarise, tidy

ABLATION_FILE = "ablation.json"  # rows, seeds, dataset, checkpoint rule, source: what the table needs
TABLE_STEM = "ablation"


def write_meta(plan, ablation_dir: Path) -> Path:
    study = plan.study
    meta = {"name": plan.name, "study": study.name, "method": study.method, "dataset": Path(study.data.root).name,
            "rows": [r.name for r in plan.rows], "seeds": list(plan.seeds), "epochs": study.train.epochs,
            "select": study.ablation.select, "source": plan.source}
    path = ablation_dir / ABLATION_FILE
    path.write_text(json.dumps(meta, indent=2, default=str))
    return path


def read_meta(ablation_dir: Path) -> dict:
    return json.loads((Path(ablation_dir) / ABLATION_FILE).read_text())


def write_tables(trials: pd.DataFrame, meta: dict, out_dir: Path) -> tuple[str, list[Path]]:
    """``ablation.md``, ``ablation.tex``, ``ablation.csv`` in ``out_dir``; returns the Markdown.

    The checkpoint rule is the stored ``select``; an ``ablation.json`` written before it existed
    means ``final`` (its trials reported no best-validation metrics)."""
    order = meta["rows"]
    blocks = blocks_of(trials, meta.get("select", FINAL))
    summaries = {block: summarise(trials, order, block) for block in blocks}
    text = caption(meta["method"], meta["dataset"], meta["seeds"], blocks, order, summaries)
    text += source_caption(meta.get("source"))
    markdown = to_markdown(summaries, text)
    files = [out_dir / f"{TABLE_STEM}.{ext}" for ext in ("md", "tex", "csv")]
    files[0].write_text(markdown)
    files[1].write_text(to_latex(summaries, text, label=f"tab:{meta['name']}"))
    tidy(summaries).to_csv(files[2], index=False, float_format="%.4f")
    return markdown, files


def source_caption(source: dict | None) -> str:
    """Where the rows' hyperparameters came from: ``--from-study`` (one search, its best trial for
    every row), ``--tune-rows`` (a search per row), or nothing (the study file's values)."""
    if not source:
        return ""
    if "tune_rows" in source:
        return (f" Hyperparameters: each row's own best of {source['tune_rows']} search trials "
                f"(by validation {source.get('metric', 'rsum')}).")
    return f" Hyperparameters: best trial {source['trial_id']} of {Path(source['from_study']).name}."
