"""The study report's figures and parameter importances (Agg backend: no display needed).

A TPE / random study is read back from its Optuna journal and drawn with Optuna's own matplotlib
plots. A grid study has no Optuna study, so its per-parameter plots come from ``results.csv``.
Every "cannot draw this" case becomes a note in the report instead of an error.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: reports are built on headless machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.exceptions import ExperimentalWarning  # noqa: E402
from optuna.storages import JournalStorage  # noqa: E402
from optuna.storages.journal import JournalFileBackend  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from optuna.visualization import matplotlib as ovm  # noqa: E402


@dataclass
class Figures:
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)  # caption -> PNG
    importances: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def figure_of(axes):
    """Optuna returns one Axes or an array of them (one per parameter)."""
    return np.atleast_1d(axes).ravel()[0].figure


def load_optuna_study(journal: Path, name: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))


def importances(study, params: list[str], figures: Figures, target=None, target_name: str = "") -> None:
    """Importances by Optuna's default evaluator (PED-ANOVA in Optuna 5), or a note saying why there are
    none. ``target``: which value of a multi-objective trial (Optuna needs one number)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        figures.notes.append(f"Parameter importances need at least 2 completed trials; this study has {len(complete)}.")
        return
    if len(params) < 2:
        figures.notes.append(f"Only one searched parameter ({', '.join(params)}): its importance is 1 by definition.")
        figures.importances = {name: 1.0 for name in params}
        return
    with warnings.catch_warnings(record=True) as caught:  # e.g. "too few trials": the report says so
        warnings.simplefilter("always", UserWarning)
        try:
            figures.importances = optuna.importance.get_param_importances(study, target=target)
        except (ValueError, RuntimeError) as err:  # e.g. no parameter common to every completed trial
            figures.notes.append(f"Parameter importances could not be computed: {err}")
            return
        named = {"target": target, "target_name": target_name} if target is not None else {}
        axes = ovm.plot_param_importances(study, **named)  # recomputes them: inside the same warning capture
    figures.notes += sorted({f"Optuna: {w.message}" for w in caught if issubclass(w.category, UserWarning)
                             and not issubclass(w.category, ExperimentalWarning)})
    about = f" for {target_name}" if target is not None else ""
    figures.files[f"Parameter importances{about} (Optuna's default evaluator, PED-ANOVA)"] = save(
        figure_of(axes), figures.out_dir / "importances.png")


class Objective:
    """One value of a multi-objective trial, for Optuna's plots (they take one number per trial)."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, trial) -> float:
        return trial.values[self.index]


PARETO_FILE = "pareto.png"


def pareto_front(study, names: list[str], figures: Figures) -> None:
    """Optuna's Pareto-front plot (two or three objectives; dominated trials drawn too)."""
    if len(names) > 3:
        figures.notes.append(f"Optuna draws a Pareto front of two or three objectives; this study has {len(names)}.")
        return
    axes = ovm.plot_pareto_front(study, target_names=names)
    figures.files["Pareto front (" + " vs ".join(names) + "; Optuna)"] = save(figure_of(axes),
                                                                            figures.out_dir / PARETO_FILE)


def optuna_figures(journal: Path, name: str, objectives: list[tuple[str, str]], params: list[str],
                   out_dir: Path) -> Figures:
    """Optimisation history, parallel coordinates, metric vs each parameter, importances; with several
    objectives the Pareto front first and the others drawn for the first objective."""
    figures = Figures(out_dir)
    study = load_optuna_study(journal, name)
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if not complete:
        figures.notes.append("No completed trial in the Optuna journal yet: nothing to plot.")
        return figures
    metric = objectives[0][0]
    target = {"target": Objective(0)} if len(objectives) > 1 else {}
    plots = {"Optimisation history": (ovm.plot_optimization_history, "history.png"),
             "Parallel coordinates": (ovm.plot_parallel_coordinate, "parallel.png"),
             f"{metric} vs each searched parameter": (ovm.plot_slice, "slice.png")}
    if complete < 2:  # one point has no spread to draw: matplotlib would warn about singular axes
        plots = dict(list(plots.items())[:1])
        figures.notes.append("Parallel coordinates and per-parameter plots need at least 2 completed trials.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # Optuna marks its matplotlib backend experimental
        if target:
            pareto_front(study, [n for n, _ in objectives], figures)
        for caption, (plot, file) in plots.items():
            about = f" of {metric}" if target and caption == "Optimisation history" else ""
            figures.files[caption + about] = save(figure_of(plot(study, target_name=metric, **target)), out_dir / file)
        importances(study, params, figures, target.get("target"), metric)
    return figures


def grid_figures(trials: pd.DataFrame, metric: str, params: list[str], out_dir: Path,
                 kind: str = "a grid study") -> Figures:
    """``metric`` against each searched parameter from ``results.csv`` (grid and PBT studies; a PBT
    trial's values are its last ones)."""
    figures = Figures(out_dir)
    figures.notes.append("Parameter importances need a TPE or random study (an Optuna journal); "
                         f"this is {kind}, so only the per-parameter plots are drawn.")
    done = trials.dropna(subset=[metric]) if metric in trials else trials.iloc[0:0]
    if done.empty or not params:
        figures.notes.append(f"No trial reported {metric!r}: nothing to plot.")
        return figures
    fig, axes = plt.subplots(1, len(params), figsize=(3.6 * len(params), 3.2), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], params):
        values = done[name].astype(str) if done[name].dtype == object else done[name]
        ax.scatter(values, done[metric], alpha=0.8)
        ax.set_xlabel(name)
        if pd.api.types.is_numeric_dtype(values) and values.min() > 0 and values.max() / values.min() > 20:
            ax.set_xscale("log")  # learning rates and loss weights span decades
    axes[0][0].set_ylabel(metric)
    figures.files[f"{metric} vs each searched parameter"] = save(fig, out_dir / "params.png")
    return figures


# --------------------------------------------------------------------------------------------------
# Ablation: the forest plot of Δ rSum against the reference row
# --------------------------------------------------------------------------------------------------

BLOCK_TITLES = {"test": "Test split", "1k": "1K test (5-fold average)", "5k": "5K test", "val": "Validation split"}
CI_COLUMNS = ("delta_ci_low", "delta_ci_high")
INK = "#1f4e79"


@dataclass
class Forest:
    """What ``forest_plot`` drew: one row per (block, non-reference row) in table order, with
    ``delta``, ``low``/``high`` (NaN where no whisker) and ``significant``; ``path`` is None when there
    was nothing to draw (the notes say why)."""

    path: Path | None
    points: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def as_flag(values: pd.Series) -> pd.Series:
    """CSV booleans read back as bool, or as strings / objects when a cell is empty: empty = not marked."""
    return values.astype(str).str.strip().str.lower().isin(("true", "1", "1.0"))


def forest_points(frame: pd.DataFrame, reference: str) -> tuple[pd.DataFrame, list[str]]:
    """The tidy ablation table -> the points to draw, plus notes on what could not be drawn fully."""
    rows = frame[frame["variant"].astype(str) != reference]
    has_ci = all(c in frame for c in CI_COLUMNS)
    points = pd.DataFrame({
        "block": rows["block"].astype(str), "variant": rows["variant"].astype(str),
        "delta": pd.to_numeric(rows["delta_rsum"], errors="coerce"),
        "low": pd.to_numeric(rows["delta_ci_low"], errors="coerce") if has_ci else np.nan,
        "high": pd.to_numeric(rows["delta_ci_high"], errors="coerce") if has_ci else np.nan,
        "significant": as_flag(rows["significant"]) if "significant" in rows else False}).reset_index(drop=True)
    notes = []
    if not has_ci:
        notes.append("ablation.csv has no 95 % CI of Δ rSum (it predates the paired test): "
                     "the forest plot shows each Δ without a whisker.")
    else:
        bare = points[points["delta"].notna() & (points["low"].isna() | points["high"].isna())]
        if not bare.empty:
            notes.append("No 95 % CI (fewer than two paired seeds, or identical per-seed differences) for "
                         + ", ".join(f"{v} ({b})" for b, v in zip(bare["block"], bare["variant"]))
                         + ": drawn without a whisker.")
    missing = points[points["delta"].isna()]
    if not missing.empty:
        notes.append("No completed trial, so no Δ, for " + ", ".join(dict.fromkeys(missing["variant"])) + ".")
    return points, notes


def forest_panel(ax, points: pd.DataFrame, names: list[str], reference: str) -> None:
    """One block: rows top to bottom in table order; filled = significant, open = not; each Δ
    printed above its point so the figure reads without the table."""
    y = {name: len(names) - 1 - i for i, name in enumerate(names)}
    drawn = points[points["delta"].notna()]
    whisker = drawn[drawn["low"].notna() & drawn["high"].notna()]
    rows = [y[v] for v in whisker["variant"]]
    ax.hlines(rows, whisker["low"], whisker["high"], color=INK, lw=1.6, zorder=2)
    ax.plot([*whisker["low"], *whisker["high"]], rows * 2, ls="", marker="|", ms=7, mew=1.6, color=INK, zorder=2)
    for filled, group in drawn.groupby("significant"):
        ax.scatter(group["delta"], [y[v] for v in group["variant"]], s=46, zorder=3, edgecolors=INK,
                   facecolors=INK if filled else "white", linewidths=1.4)
    for delta, name in zip(drawn["delta"], drawn["variant"]):
        ax.annotate(f"{delta:+.1f}".replace("-", "−"), (delta, y[name]), xytext=(0, 6), textcoords="offset points",
                    ha="center", va="bottom", fontsize=7.5, color=INK)
    ends = pd.concat([drawn["delta"], whisker["low"], whisker["high"], pd.Series([0.0])])
    span = max(float(ends.max() - ends.min()), 1.0)
    ax.set_xlim(float(ends.min()) - 0.12 * span, float(ends.max()) + 0.12 * span)
    for name in points.loc[points["delta"].isna(), "variant"]:
        ax.text(0.5, y[name], "no completed trial", transform=ax.get_yaxis_transform(), va="center", ha="center",
                color="#888", fontsize=8, style="italic")
    ax.axvline(0, color="#888", lw=1, ls="--", zorder=1)
    ax.text(0, 1.01, reference, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8,
            color="#666")
    ax.set_ylim(-0.6, len(names) - 0.3)
    ax.set_yticks(list(y.values()), list(y))
    ax.grid(axis="x", color="#eee", zorder=0)


def forest_figure(frame: pd.DataFrame, reference: str, title: str):
    """``(figure, points, notes)``; figure is None when no block has a row besides the reference."""
    points, notes = forest_points(frame, reference)
    if points.empty:
        return None, points, notes + [f"Only the reference row ({reference}) is in the table: no forest plot."]
    blocks = list(dict.fromkeys(points["block"]))
    names = list(dict.fromkeys(points["variant"]))
    drew_ci = bool((points["low"].notna() & points["high"].notna()).any())
    fig, axes = plt.subplots(1, len(blocks), squeeze=False, sharey=True,
                             figsize=(2.2 + 4.2 * len(blocks), 1.9 + 0.42 * max(len(names), 2)))
    label = f"Δ rSum vs {reference} " + ("(95 % CI, paired t over seeds)" if drew_ci else "(no CI available)")
    for ax, block in zip(axes[0], blocks):
        forest_panel(ax, points[points["block"] == block], names, reference)
        ax.set_title(BLOCK_TITLES.get(block, block), fontsize=10, pad=14)
        ax.set_xlabel(label, fontsize=9)
    mark = "Holm-adjusted p < 0.05" if "p_holm" in frame else "p < 0.05"
    handles = [plt.Line2D([], [], color="#888", ls="--", label=f"{reference} (reference, Δ = 0)"),
               plt.Line2D([], [], marker="o", ls="", color=INK, label=mark),
               plt.Line2D([], [], marker="o", ls="", color=INK, markerfacecolor="white", label="not significant")]
    fig.legend(handles=handles, loc="lower center", ncol=3, frameon=False, fontsize=8.5, bbox_to_anchor=(0.5, 0))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))  # the bottom 0.3 in holds the legend
    return fig, points, notes


def forest_plot(frame: pd.DataFrame, reference: str, out_path: Path, title: str) -> Forest:
    """Δ rSum of each non-reference row with its 95 % CI, one panel per block of the tidy
    ``ablation.csv`` frame. A row without a CI (older tables, a single seed) keeps its point."""
    fig, points, notes = forest_figure(frame, reference, title)
    return Forest(save(fig, Path(out_path)) if fig is not None else None, points, notes)


# --------------------------------------------------------------------------------------------------
# PBT: the loss-weight schedules its trials followed
# --------------------------------------------------------------------------------------------------

SCHEDULE_FILE = "schedules.png"


def schedule_figure(schedules: pd.DataFrame, names: list[str], log_scale: set[str], out_path: Path,
                    metric: str) -> Path | None:
    """One panel per mutated value: each trial's value per epoch (legend order = rank by ``metric``),
    a ring where PBT changed it. None when no trial reported an epoch."""
    if schedules.empty:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(3.8 * len(names), 3.3), squeeze=False)
    for ax, name in zip(axes[0], names):
        for rank, (trial_id, rows) in enumerate(schedules.groupby("trial_id", sort=False), 1):
            line, = ax.plot(rows["epoch"], rows[name], marker=".", label=f"#{rank} {trial_id}")
            moved = rows[rows["changed"]]
            ax.scatter(moved["epoch"], moved[name], s=70, facecolors="none", edgecolors=line.get_color(), zorder=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if name in log_scale:
            ax.set_yscale("log")
        ax.grid(color="#eee")
    axes[0][0].legend(fontsize=7.5, title=f"rank by {metric}", title_fontsize=8)
    fig.suptitle("PBT weight schedules (ring: values changed by an exploit/explore step)", fontsize=10)
    fig.tight_layout()
    return save(fig, out_path)
