"""``study report DIR``: rebuild a study's report from stored results, without retraining.

A search study (``storage.path/NAME``) gets ``DIR/report/``: the top-k trials table (Markdown),
parameter importances, optimisation history, parallel coordinates and the metric against each
searched parameter (PNG), and ``index.html`` with everything embedded. An ablation directory
(``NAME-ablation``) gets its table rebuilt in all three formats. Both are logged to the MLflow
parent run recorded in the directory. Works on finished, interrupted and resumed directories.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from study import tracking
from study.ablation.output import ABLATION_FILE, read_meta, write_tables
from study.ablation.render import markdown_table
from study.layout import OPTUNA_JOURNAL, REPORT_DIR, RESULTS_FILE, load_stored_study, load_study_dir, read_parent
from study.report.html import html_page
from study.report.plots import grid_figures, optuna_figures
from study.report.trial_dirs import read_trial_dirs
from study.results import BUDGET_PREFIX, RETRIEVAL
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


def top_trials(trials: pd.DataFrame, params: list[str], metric: str, mode: str, k: int) -> pd.DataFrame:
    """The best ``k`` trials by ``metric`` as display strings: rank, id, status, values, metrics."""
    done = trials.dropna(subset=[metric]) if metric in trials else trials.iloc[0:0]
    ranked = done.sort_values(metric, ascending=mode == "min").head(k)
    shown = [m for m in (metric, *RETRIEVAL) if m in ranked]
    table = pd.DataFrame({c: ranked[c].map(fmt) for c in ("trial_id", "status", "epochs", *params) if c in ranked})
    for name in dict.fromkeys(shown):
        table[name] = ranked[name].map(lambda v: f"{v:.1f}")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def study_report(study_dir: Path, top: int) -> Report:
    study, params, study_dir, parent = load_study_dir(study_dir)
    trials, notes = load_trials(study_dir, study.train.epochs)
    out = study_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    metric, names = study.search.metric, list(params)
    journal = study_dir / OPTUNA_JOURNAL
    if study.search.algorithm != "grid" and journal.is_file():
        figures = optuna_figures(journal, study.name, metric, names, out)
    else:
        if study.search.algorithm != "grid":
            notes.append("No Optuna journal in the study directory: figures were drawn from the trial table.")
        figures = grid_figures(trials, metric, names, out)
    table = top_trials(trials, names, metric, study.search.mode, top)
    summary = summary_lines(study, trials, names)
    tables = {f"Top {len(table)} trials by {metric}": table}
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
    return [f"Method {study.method}; {study.search.algorithm} search over {len(params)} parameter(s) "
            f"({', '.join(params)}); {len(trials)} trials ({counts}); metric {study.search.metric} "
            f"({study.search.mode}), {study.train.epochs} epoch(s) per trial."]


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


def ablation_report(ablation_dir: Path) -> Report:
    """The ablation table again in all three formats from the stored per-trial results."""
    study = load_stored_study(ablation_dir)
    meta = read_meta(ablation_dir)
    trials, notes = load_trials(ablation_dir, meta["epochs"])
    markdown, files = write_tables(trials, meta, ablation_dir)
    budget = budget_table(trials, "variant")
    if budget is not None:
        markdown += f"\n\n## {BUDGET_HEADING}\n\n{markdown_table(budget)}\n"
    parent = read_parent(ablation_dir)
    for path in files:
        log_to_parent(study, parent, path, None)
    return Report(ablation_dir, markdown, files, notes)
