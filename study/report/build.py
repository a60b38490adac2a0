"""``study report DIR``: rebuild a study's report from stored results, without retraining.

A search study (``storage.path/NAME``) gets ``DIR/report/``: the top-k trials table (Markdown),
parameter importances, optimisation history, parallel coordinates and the metric against each
searched parameter (PNG), and ``index.html`` with everything embedded. An ablation directory
(``NAME-ablation``) gets its table rebuilt in all three formats, and ``DIR/report/`` gets a forest
plot of Δ rSum per row (``forest.png``) and ``index.html``. Both are logged to the MLflow parent run
recorded in the directory. Works on finished, interrupted and resumed directories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from study import tracking
from study.ablation.output import ABLATION_FILE, TABLE_STEM, read_meta, source_caption, write_tables
from study.ablation.render import HEADERS, markdown_table, mean_std, signed
from study.ablation.stats import reference_of
from study.ablation.tracking import publish_table
from study.layout import OPTUNA_JOURNAL, REPORT_DIR, RESULTS_FILE, load_stored_study, load_study_dir, read_parent
from study.report.html import html_page
from study.report.plots import (
    BLOCK_TITLES,
    SCHEDULE_FILE,
    Figures,
    as_flag,
    forest_plot,
    grid_figures,
    optuna_figures,
    schedule_figure,
)
from study.report.trial_dirs import read_schedules, read_trial_dirs
from study.results import BUDGET_PREFIX, RETRIEVAL, SCHEDULES_FILE, judged, pareto_trials
from study.spaces import WARM_START_KEY
from trainables.errors import ConfigError


@dataclass
class Report:
    out_dir: Path
    markdown: str
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def build_report(directory: str | Path, top: int = 10) -> Report:
    directory = Path(directory).expanduser().resolve()
    if (directory / ABLATION_FILE).is_file():
        return ablation_report(directory)
    return study_report(directory, top)


def load_trials(run_dir: Path, epochs: int) -> tuple[pd.DataFrame, list[str]]:
    """``results.csv``, or for a driver that was killed before writing it, Tune's trial directories."""
    if (run_dir / RESULTS_FILE).is_file():
        return pd.read_csv(run_dir / RESULTS_FILE, dtype={"trial_id": str, "variant": str}), []
    trials = read_trial_dirs(run_dir, epochs)
    if trials.empty:
        raise ConfigError(f"{run_dir}: no {RESULTS_FILE} and no trial directories yet; nothing to report")
    return trials, [f"No {RESULTS_FILE} (the run was interrupted before it finished): trials were read from "
                    "their Tune directories; 'incomplete' = fewer epochs than configured."]


def fmt(value) -> str:
    if isinstance(value, float):
        return "–" if value != value else f"{value:.4g}"
    return str(value)


def top_trials(trials: pd.DataFrame, params: list[str], metric: str, mode: str, k: int,
               also: tuple[str, ...] = ()) -> pd.DataFrame:
    """The best ``k`` trials by ``metric`` as display strings: rank, id, status, warm-start label (when
    the study had warm-start trials), values, metrics (``also``: other objectives, shown after it)."""
    done = trials.dropna(subset=[metric]) if metric in trials else trials.iloc[0:0]
    ranked = done.sort_values(metric, ascending=mode == "min").head(k)
    return display_rows(ranked, params, (metric, *also))


def display_rows(ranked: pd.DataFrame, params: list[str], metrics: tuple[str, ...]) -> pd.DataFrame:
    """Trials in the given order as display strings, ranked 1, 2, ..."""
    columns = ("trial_id", "status", WARM_START_KEY, "epochs", *params)
    table = pd.DataFrame({c: ranked[c].map(lambda v: "" if v != v else fmt(v)) if c == WARM_START_KEY
                          else ranked[c].map(fmt) for c in columns if c in ranked})
    for name in dict.fromkeys(m for m in (*metrics, *RETRIEVAL) if m in ranked):
        table[name] = ranked[name].map(lambda v: "–" if v != v else (f"{v:.1f}" if name in RETRIEVAL else f"{v:.4g}"))
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def study_figures(study, params: dict, trials: pd.DataFrame, study_dir: Path, out: Path,
                  notes: list[str]) -> Figures:
    """Optuna's plots from the journal (TPE, random); the per-parameter plots from the trial table
    (grid, PBT, or no journal); for PBT also the weight schedules of the top trials."""
    s, names = study.search, list(params)
    journal = study_dir / OPTUNA_JOURNAL
    if s.algorithm not in ("grid", "pbt") and journal.is_file():
        return optuna_figures(journal, study.name, s.objectives, names, out)
    if s.algorithm not in ("grid", "pbt"):
        notes.append("No Optuna journal in the study directory: figures were drawn from the trial table.")
    figures = grid_figures(trials, s.primary, names, out, "a PBT study" if s.algorithm == "pbt" else "a grid study")
    if s.algorithm == "pbt":
        top = judged(trials, [s.primary]).sort_values(s.primary, ascending=s.primary_mode == "min").head(5)
        log_scale = {name for name, param in params.items() if param.type == "loguniform" or param.log}
        schedules = read_schedules(study_dir / SCHEDULES_FILE, list(top["trial_id"].astype(str)), names)
        path = schedule_figure(schedules, names, log_scale, out / SCHEDULE_FILE, s.primary)
        if path is None:
            figures.notes.append(f"No {SCHEDULES_FILE} with a reported epoch: no weight schedules to draw.")
        else:
            figures.files[f"Weight schedules of the top {len(top)} trials by {s.primary} (PBT)"] = path
    return figures


def study_report(study_dir: Path, top: int) -> Report:
    study, params, study_dir, parent = load_study_dir(study_dir)
    trials, notes = load_trials(study_dir, study.train.epochs)
    out = study_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    s, names = study.search, list(params)
    metric = s.primary
    figures = study_figures(study, params, trials, study_dir, out, notes)
    others = tuple(name for name, _ in s.objectives[1:])
    table = top_trials(trials, names, metric, s.primary_mode, top, others)
    summary = summary_lines(study, trials, names) + warm_start_lines(trials, metric, s.primary_mode)
    tables = {}
    if s.multi_objective:
        pareto = pareto_trials(trials, s.objectives)
        count = f"{len(pareto)} trial" + ("" if len(pareto) == 1 else "s")
        tables[f"Pareto set ({count}, best {metric} first)"] = display_rows(
            pareto, names, tuple(name for name, _ in s.objectives))
    tables[f"Top {len(table)} trials by {metric}"] = table
    shown = trials.set_index("trial_id").loc[list(table["trial_id"])].reset_index()
    budget = budget_table(shown, "trial_id")
    if budget is not None:
        tables[BUDGET_HEADING] = budget
    if figures.importances:
        tables["Parameter importances"] = pd.DataFrame(
            {"parameter": list(figures.importances), "importance": [f"{v:.3f}" for v in figures.importances.values()]})
    notes += figures.notes
    markdown = report_markdown(study.name, summary, tables, notes)
    files = write_report(out, study.name, summary, tables, figures.files, notes, markdown)
    log_to_parent(study, parent, out, REPORT_DIR)
    return Report(out, markdown, files, notes)


BUDGET_HEADING = "Term budget (each loss term's share of the encoders' gradient norm, last epoch)"


def budget_table(trials: pd.DataFrame, by: str) -> pd.DataFrame | None:
    """Mean ``budget/<term>`` share per ``by`` (a trial, or an ablation row over its seeds), in %.
    None when the trials logged no budget (results from before it was measured)."""
    columns = [c for c in trials.columns if c.startswith(BUDGET_PREFIX)]
    if not columns or trials.empty:
        return None
    means = trials.groupby(by, sort=False)[columns].mean()
    table = means.apply(lambda column: column.map(lambda v: "–" if v != v else f"{100 * v:.1f} %"))
    table.columns = [c.removeprefix(BUDGET_PREFIX) for c in columns]
    return table.reset_index()


def summary_lines(study, trials: pd.DataFrame, params: list[str]) -> list[str]:
    counts = ", ".join(f"{n} {status}" for status, n in trials["status"].value_counts().items())
    s = study.search
    goal = (f"objectives {', '.join(f'{n} ({m})' for n, m in s.objectives)}, no single best trial but a "
            "Pareto set" if s.multi_objective else f"metric {s.metric} ({s.mode})")
    schedule = "" if s.algorithm == "pbt" else f", scheduler {s.scheduler}"
    return [f"Method {study.method}; {s.algorithm} search over {len(params)} parameter(s) "
            f"({', '.join(params)}); {len(trials)} trials ({counts}); {goal}{schedule}, "
            f"{study.train.epochs} epoch(s) per trial."]


def warm_start_lines(trials: pd.DataFrame, metric: str, mode: str) -> list[str]:
    """One line per warm-start trial: its label, id and ``metric``, and how the study's best compares."""
    if WARM_START_KEY not in trials:
        return []
    marked = trials[trials[WARM_START_KEY].fillna("").astype(str) != ""]
    pool = judged(trials, [metric])
    best = (pool[metric].max() if mode == "max" else pool[metric].min()) if len(pool) else float("nan")
    lines = []
    for _, row in marked.iterrows():
        value = row.get(metric, float("nan"))
        gap = "" if value != value or best != best else f"; best {metric} − this = {signed(best - value)}"
        lines.append(f"Warm start '{row[WARM_START_KEY]}': trial {row['trial_id']} ({row['status']}), "
                     f"{metric} {fmt(value)}{gap}.")
    return lines


def report_markdown(name: str, summary: list[str], tables: dict[str, pd.DataFrame], notes: list[str]) -> str:
    parts = [f"# Study report: {name}", "", *summary, ""]
    for heading, frame in tables.items():
        parts += [f"## {heading}", "", markdown_table(frame), ""]
    parts += [f"- {note}" for note in notes]
    return "\n".join(parts).rstrip() + "\n"


def write_report(out: Path, name: str, summary, tables, figures: dict[str, Path], notes, markdown: str) -> list[Path]:
    (out / "report.md").write_text(markdown)
    (out / "index.html").write_text(html_page(f"Study report: {name}", summary, tables, figures, notes))
    return [out / "report.md", out / "index.html", *figures.values()]


def log_to_parent(study, parent: str, path: Path, artifact_path: str | None) -> None:
    client, _ = tracking.client_for(study.tracking.uri, study.tracking.experiment)
    if path.is_dir():
        client.log_artifacts(parent, str(path), artifact_path=artifact_path)
    else:
        client.log_artifact(parent, str(path), artifact_path=artifact_path)


FOREST_FILE = "forest.png"
CHECKPOINT_RULES = {"best_val": "the epoch with the best validation rSum", "final": "the final epoch"}


def ablation_report(ablation_dir: Path, log: bool = True) -> Report:
    """The ablation table again in all three formats from the stored per-trial results, then
    ``report/forest.png`` (Δ rSum with its CI per row) and ``report/index.html``."""
    study = load_stored_study(ablation_dir)
    meta = read_meta(ablation_dir)
    trials, notes = load_trials(ablation_dir, meta["epochs"])
    markdown, files = write_tables(trials, meta, ablation_dir)
    table = pd.read_csv(ablation_dir / f"{TABLE_STEM}.csv", dtype={"variant": str, "block": str})
    reference = reference_of(list(meta["rows"]))
    out = ablation_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    forest = forest_plot(table, reference, out / FOREST_FILE, f"Ablation of {meta['method']} on {meta['dataset']}")
    notes += forest.notes
    tables = {BLOCK_TITLES.get(block, block): ablation_display(rows)
              for block, rows in table.groupby("block", sort=False)}
    caption = table_caption(files[0].read_text())
    captions = {list(tables)[-1]: caption} if caption and tables else {}
    budget = budget_table(trials, "variant")
    if budget is not None:
        markdown += f"\n\n## {BUDGET_HEADING}\n\n{markdown_table(budget)}\n"
        tables[BUDGET_HEADING] = budget
    figures = {} if forest.path is None else {f"Δ rSum vs {reference} per row (forest plot)": forest.path}
    (out / "index.html").write_text(html_page(f"Ablation report: {meta['name']}", ablation_summary(meta, trials),
                                              tables, figures, notes, captions))
    if log:
        parent = read_parent(ablation_dir)
        for path in files:
            log_to_parent(study, parent, path, None)
        log_to_parent(study, parent, out, REPORT_DIR)
        # The MLflow UI as the viewer: the table in the parent's description, per-row metrics, the plot.
        publish_table(study.tracking.uri, study.tracking.experiment, parent, files[0].read_text(), files[2],
                      [] if forest.path is None else [forest.path])
    return Report(out, markdown, [*files, *figures.values(), out / "index.html"], notes)


def ablation_summary(meta: dict, trials: pd.DataFrame) -> list[str]:
    """What was compared, over which seeds, at which checkpoint, with which hyperparameters."""
    select = meta.get("select")
    checkpoint = CHECKPOINT_RULES.get(select, str(select)) if select else \
        "the final epoch (ablation.json names no checkpoint rule)"
    counts = ", ".join(f"{n} {status}" for status, n in trials["status"].value_counts().items())
    return [f"Method {meta['method']} on {meta['dataset']}; rows {', '.join(meta['rows'])} "
            f"(reference: {reference_of(list(meta['rows']))}); seeds {', '.join(map(str, meta['seeds']))}; "
            f"{meta['epochs']} epoch(s) per trial; {len(trials)} trials ({counts}).",
            f"Metrics at {checkpoint}. Hyperparameters: {hyperparameter_source(meta.get('source'))}."]


def hyperparameter_source(source) -> str:
    return source_caption(source).removeprefix(" Hyperparameters: ").removesuffix(".") or "the study file's values"


def table_caption(markdown: str) -> str | None:
    """The caption of ``ablation.md``: its last paragraph that is neither a table nor a block heading."""
    paragraphs = [p.strip() for p in markdown.split("\n\n") if p.strip()]
    text = [p for p in paragraphs if not p.startswith(("|", "**"))]
    return text[-1] if text else None


def ablation_display(rows: pd.DataFrame) -> pd.DataFrame:
    """One block of ``ablation.csv`` as cells: mean ± std, Δ rSum with its CI, p and Holm-adjusted p."""
    reference = reference_of(list(rows["variant"]))
    significant = as_flag(rows["significant"]) if "significant" in rows else pd.Series(False, index=rows.index)
    cells = {"Variant": rows["variant"]}
    for metric, header in zip(RETRIEVAL, HEADERS):
        cells[header] = [mean_std(m, s) for m, s in zip(rows[f"{metric}_mean"], rows[f"{metric}_std"])]
    cells["rSum"] = [c + ("†" if flag else "") for c, flag in zip(cells["rSum"], significant)]
    has_ci = {"delta_ci_low", "delta_ci_high"} <= set(rows.columns)
    low = rows["delta_ci_low"] if has_ci else pd.Series(float("nan"), index=rows.index)
    high = rows["delta_ci_high"] if has_ci else pd.Series(float("nan"), index=rows.index)
    cells[f"Δ rSum vs {reference}" + (" [95 % CI]" if has_ci else "")] = [
        "–" if name == reference else delta_with_ci(d, lo, hi)
        for name, d, lo, hi in zip(rows["variant"], rows["delta_rsum"], low, high)]
    for column, header in (("p_value", "p"), ("p_holm", "p (Holm-adjusted)")):
        if column in rows:
            cells[header] = [fmt_p(v) for v in rows[column]]
    if "n" in rows:
        cells["seeds"] = rows["n"].map(fmt)
    if "epoch_mean" in rows:  # the checkpoint's epoch, averaged over seeds
        cells["epoch (mean)"] = rows["epoch_mean"].map(lambda v: "–" if v != v else f"{v:.1f}")
    return pd.DataFrame(cells)


def delta_with_ci(delta: float, low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return signed(delta)
    return f"{signed(delta)} [{signed(low)}, {signed(high)}]"


def fmt_p(value) -> str:
    value = float(value)
    if not math.isfinite(value):
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"
