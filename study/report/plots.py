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


def importances(study, params: list[str], figures: Figures) -> None:
    """Importances by Optuna's default evaluator (PED-ANOVA in Optuna 5), or a note saying why there are none."""
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
            figures.importances = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError) as err:  # e.g. no parameter common to every completed trial
            figures.notes.append(f"Parameter importances could not be computed: {err}")
            return
        axes = ovm.plot_param_importances(study)  # recomputes them: inside the same warning capture
    figures.notes += sorted({f"Optuna: {w.message}" for w in caught if issubclass(w.category, UserWarning)
                             and not issubclass(w.category, ExperimentalWarning)})
    figures.files["Parameter importances (Optuna's default evaluator, PED-ANOVA)"] = save(
        figure_of(axes), figures.out_dir / "importances.png")


def optuna_figures(journal: Path, name: str, metric: str, params: list[str], out_dir: Path) -> Figures:
    """Optimisation history, parallel coordinates, metric vs each parameter, importances."""
    figures = Figures(out_dir)
    study = load_optuna_study(journal, name)
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if not complete:
        figures.notes.append("No completed trial in the Optuna journal yet: nothing to plot.")
        return figures
    plots = {"Optimisation history": (ovm.plot_optimization_history, "history.png"),
             "Parallel coordinates": (ovm.plot_parallel_coordinate, "parallel.png"),
             f"{metric} vs each searched parameter": (ovm.plot_slice, "slice.png")}
    if complete < 2:  # one point has no spread to draw: matplotlib would warn about singular axes
        plots = dict(list(plots.items())[:1])
        figures.notes.append("Parallel coordinates and per-parameter plots need at least 2 completed trials.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # Optuna marks its matplotlib backend experimental
        for caption, (plot, file) in plots.items():
            figures.files[caption] = save(figure_of(plot(study, target_name=metric)), out_dir / file)
        importances(study, params, figures)
    return figures


def grid_figures(trials: pd.DataFrame, metric: str, params: list[str], out_dir: Path) -> Figures:
    """``metric`` against each searched parameter from ``results.csv`` (grid studies)."""
    figures = Figures(out_dir)
    figures.notes.append("Parameter importances need a TPE or random study (an Optuna journal); "
                         "this is a grid study, so only the per-parameter plots are drawn.")
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
