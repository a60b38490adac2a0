"""``ablate --tune-rows N``: every row's own search, before the grid runs at each row's best values.

A row's search is a search study of its own (``plan.row_search_study``: the row's method and
switches, the study's space less what the row cannot use, TPE + ASHA, N trials) in
``ABLATION_DIR/tune/<row slug>/``, laid out like ``study run``'s directory, so
``python -m study report ABLATION_DIR/tune/<slug>`` draws it. Its trials are MLflow children of the
ablation's parent run, tagged ``kind=row-search`` and ``variant=<row>``. Rows are searched one after
another; each finished search is recorded in ``ablation.json`` (``source.rows``) at once, so a resumed
ablation reads it instead of searching again, and an interrupted one continues from Tune's state.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml

from study import tracking
from study.ablation.output import write_meta
from study.ablation.plan import AblationPlan, searched_values, tuned_plan
from study.layout import (
    OPTUNA_JOURNAL,
    RESULTS_FILE,
    SPACE_FILE,
    STUDY_FILE,
    TUNER_STATE,
    load_study_dir,
    write_parent,
)
from study.ray_session import stop_requested
from study.results import INCOMPLETE, best_trial, study_table
from study.spaces import Param, resolve_space
from trainables.errors import ConfigError


class RowSearchRuns(tracking.TrialRuns):
    """One child run per search trial of ``row``, named ``<row> search-NNN <values>`` and tagged
    ``kind=row-search``, ``variant=<row>`` and the row's own method (``base`` for the base row)."""

    def __init__(self, search, row: str, study_name: str, parent_run_id: str):
        fixed = tracking.flatten(search.model_dump(mode="json", include={"method", "data", "model", "train"}))
        fixed.update(tracking.flatten({search.method: search.method_params()}))
        super().__init__(search.tracking.uri, search.tracking.experiment, parent_run_id, study_name,
                         search.method, fixed, search.train.epochs)
        self.row = row

    def run_name(self, config: dict, number: int) -> str:
        label = " ".join(f"{k.split('.')[-1]}={tracking.short(v)}" for k, v in config.items())
        return f"{self.row} search-{number:03d} {label}".strip()

    def trial_tags(self, config: dict) -> dict[str, str]:
        return {"kind": "row-search", "variant": self.row}

    def trial_params(self, config: dict) -> dict[str, str]:
        return {**super().trial_params(config), "ablation.variant": self.row}


def search_dir(search) -> Path:
    return Path(search.storage.path) / search.name


def prepare_search(search, params: dict[str, Param], parent: str) -> None:
    """The row search's study file, space and parent run id, as ``study run`` writes them."""
    directory = search_dir(search)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STUDY_FILE).write_text(yaml.safe_dump(search.model_dump(mode="json"), sort_keys=False))
    (directory / SPACE_FILE).write_text(yaml.safe_dump(
        {"method": search.method,
         "params": {k: v.model_dump(exclude_defaults=True) for k, v in params.items()}}, sort_keys=False))
    write_parent(directory, parent)


def mark_best(search, parent: str, row: str, trial_id: str) -> None:
    """Tag the row's best search trial's child run ``best=true`` (the parent has one per row)."""
    client, experiment_id = tracking.client_for(search.tracking.uri, search.tracking.experiment)
    for run in client.search_runs([experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{parent}' and tags.kind = 'row-search' and "
            f"tags.variant = '{row}' and tags.trial_id = '{trial_id}'")):
        client.set_tag(run.info.run_id, "best", "true")


def run_row_search(plan: AblationPlan, row: str, parent: str) -> dict | None:
    """Run (or continue, from Tune's state) one row's search; its ``source.rows`` entry, or None
    when the search was interrupted before all its trials ended."""
    from study.tuner import build_tuner, restore_tuner, trial_records

    search = plan.searches[row]
    directory = search_dir(search)
    if (directory / TUNER_STATE).exists():  # continued with the study and space it started with
        search, params, _, _ = load_study_dir(directory)
        tuner = restore_tuner(str(directory), search)
    else:
        params = resolve_space(search)
        prepare_search(search, params, parent)
        tuner = build_tuner(search, params, str(directory / OPTUNA_JOURNAL),
                            RowSearchRuns(search, row, plan.study.name, parent))
    s = search.search
    records = trial_records(tuner.fit())
    if stop_requested():  # Ctrl+C / SIGTERM: Tune ended the running trials itself; interrupted, not done
        records = [replace(record, live=None) if record.live is False else record for record in records]
    table = study_table(records, params, s.metric, search.train.epochs)
    table.to_csv(directory / RESULTS_FILE, index=False)
    if stop_requested() or len(table) < s.num_samples or (table["status"] == INCOMPLETE).any():
        return None
    best = best_trial(table, s.metric, s.mode)
    if best is None:
        raise ConfigError(f"--tune-rows: no trial of row {row!r}'s search reported {s.metric} (see "
                          f"{directory / RESULTS_FILE}); fix the cause and run the ablation under "
                          "another name")
    mark_best(search, parent, row, str(best["trial_id"]))
    return {"params": sorted(params), "trial_id": str(best["trial_id"]),
            "values": searched_values(best, params), s.metric: float(best[s.metric])}


def in_row_order(plan: AblationPlan, rows: dict) -> dict:
    return {r.name: rows[r.name] for r in plan.rows if r.name in rows}


def search_rows(plan: AblationPlan, ablation_dir: Path, parent: str) -> AblationPlan | None:
    """Every row search not finished yet, in row order, each recorded in ``ablation.json`` when it
    ends. Returns the plan at each row's best values, or None if a search was interrupted."""
    rows = dict(plan.source["rows"])
    for row in plan.rows:
        if row.name in rows:  # no space, or searched before this (resumed) run: read, not searched again
            continue
        entry = run_row_search(plan, row.name, parent)
        if entry is None:
            return None
        rows[row.name] = entry
        write_meta(replace(plan, source={**plan.source, "rows": in_row_order(plan, rows)}), ablation_dir)
    return tuned_plan(plan, {**plan.source, "rows": in_row_order(plan, rows)})
