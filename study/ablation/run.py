"""``study ablate``: the ablation grid (rows × seeds) as one Ray Tune run, tracked in MLflow.

The ablation directory ``storage.path/NAME-ablation/`` holds Tune's state, the resolved study file
(fixed hyperparameters applied, rows and seeds spelled out), ``ablation.json``, the MLflow parent
run id, the per-trial ``results.csv`` and the table as ``ablation.{md,tex,csv}``; with
``--tune-rows`` also each row's search study under ``tune/<row slug>/`` (``row_search.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import yaml

from study import tracking, tracking_buffer
from study.ablation.output import ABLATION_FILE, read_meta, write_meta
from study.ablation.plan import AblationPlan, plan_ablation
from study.ablation.row_search import search_rows
from study.ablation.tracking import AblationRuns, log_outputs, start_parent_run
from study.layout import (
    PARENT_FILE,
    RESULTS_FILE,
    STUDY_FILE,
    TUNER_STATE,
    ablation_dir_of,
    load_stored_study,
    read_parent,
    write_parent,
)
from study.preflight import check_study
from study.ray_session import connect, stop_requested
from study.results import ablation_table, is_finished
from study.search import failed_runs_marked
from trainables.errors import ConfigError


@dataclass
class AblationOutcome:
    ablation_dir: Path
    trials: pd.DataFrame
    markdown: str
    files: list[Path]
    interrupted: bool
    source: dict = field(default_factory=dict)  # where the rows' values came from (ablation.json "source")


def state_of(ablation_dir: Path) -> str:
    """``new`` (nothing there), ``finished`` (every row × seed done) or ``unfinished``."""
    if not (ablation_dir / PARENT_FILE).exists():
        return "new"
    meta, results = read_meta(ablation_dir), ablation_dir / RESULTS_FILE
    if results.is_file() and is_finished(pd.read_csv(results, dtype={"trial_id": str}),
                                         len(meta["rows"]) * len(meta["seeds"])):
        return "finished"
    return "unfinished"


def finished_error(name: str, ablation_dir: Path) -> ConfigError:
    return ConfigError(f"ablation {name!r} already finished at {ablation_dir} (table: ablation.md; rebuild it "
                       f"with `python -m study report {ablation_dir}`); to run it again choose another name, "
                       "e.g. --set name=NEW")


def prepare(plan: AblationPlan, ablation_dir: Path) -> str:
    """Write the resolved study (rows and seeds spelled out, so --resume needs nothing else) and
    ``ablation.json``, open the MLflow parent run and record its id."""
    ablation_dir.mkdir(parents=True, exist_ok=True)
    resolved = plan.study.model_dump(mode="json")
    resolved["ablation"] |= {"variants": [r.name for r in plan.rows], "seeds": list(plan.seeds)}
    (ablation_dir / STUDY_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))
    meta = write_meta(plan, ablation_dir)
    parent = start_parent_run(plan, ablation_dir, [ablation_dir / STUDY_FILE, meta])
    write_parent(ablation_dir, parent)
    return parent


def run_ablation(study, from_study: str | None = None, address: str | None = None,
                 tune_rows: int | None = None, pick: str | None = None) -> AblationOutcome:
    """Validate rows, seeds, fixed hyperparameters (or every row's search space) and data, then
    search each row (``tune_rows``), run the grid and write the table."""
    plan = plan_ablation(study, from_study, tune_rows, pick)
    check_study(plan.study)
    ablation_dir = ablation_dir_of(plan.study)
    state = state_of(ablation_dir)  # like `study run`: an existing ablation is never overwritten
    if state == "finished":
        raise finished_error(plan.name, ablation_dir)
    if state == "unfinished":
        raise ConfigError(f"ablation {plan.name!r} exists at {ablation_dir} but did not finish: continue it with "
                          "`python -m study ablate STUDY.yaml --resume`, or choose another name, e.g. --set name=NEW")
    connect(address, plan.study.resources)  # a bad address, token or resource request fails here, before any write
    parent = prepare(plan, ablation_dir)
    return run_rows(plan, ablation_dir, parent, resume=False)


def resume_ablation(study, address: str | None = None) -> AblationOutcome:
    """Continue an interrupted ablation from its stored plan; finished trials are not run again."""
    ablation_dir = ablation_dir_of(study)
    state = state_of(ablation_dir)
    if state == "new":
        raise ConfigError(f"nothing to resume: no ablation at {ablation_dir}; start it without --resume")
    if state == "finished":
        raise finished_error(f"{study.name}-ablation", ablation_dir)
    source = read_meta(ablation_dir)["source"]
    plan = plan_ablation(load_stored_study(ablation_dir), tune_rows=source.get("tune_rows"))
    plan = replace(plan, source=source)  # with the row searches that finished before
    check_study(plan.study)
    parent = read_parent(ablation_dir)
    connect(address, plan.study.resources)
    return run_rows(plan, ablation_dir, parent, resume=True)


def run_rows(plan: AblationPlan, ablation_dir: Path, parent: str, resume: bool) -> AblationOutcome:
    """The row searches (``--tune-rows``), the grid and the table. A failure marks the parent and its
    open child runs FAILED in MLflow (an interruption, Ctrl-C included, leaves them for --resume)."""
    from study.tuner import build_ablation_tuner, restore_ablation_tuner, trial_records

    with failed_runs_marked(plan.study, parent, ablation_dir):
        plan = tuned(plan, ablation_dir, parent)
        if plan is None or stop_requested():  # stopped during a row search
            return searching(ablation_dir)
        if resume and (ablation_dir / TUNER_STATE).exists():
            tuner = restore_ablation_tuner(str(ablation_dir), plan.study, plan.jobs)
        else:  # a new grid, or one interrupted before Tune wrote its state
            tuner = build_ablation_tuner(plan.study, plan.name, plan.jobs, list(plan.seeds),
                                         AblationRuns(plan, parent))
        return finish(plan, ablation_dir, parent, trial_records(tuner.fit()))


def tuned(plan: AblationPlan, ablation_dir: Path, parent: str) -> AblationPlan | None:
    """With ``--tune-rows``: the plan at each row's best values once every row search has ended
    (None if one was interrupted); otherwise ``plan`` as it is."""
    return search_rows(plan, ablation_dir, parent) if "tune_rows" in plan.source else plan


def searching(ablation_dir: Path) -> AblationOutcome:
    """An ablation interrupted during a row search: no trials, no table yet."""
    return AblationOutcome(ablation_dir, pd.DataFrame(), "", [], True, read_meta(ablation_dir)["source"])


def finish(plan: AblationPlan, ablation_dir: Path, parent: str, records) -> AblationOutcome:
    """Per-trial results, the table in three formats, the forest plot and the page, all logged to the
    parent run (closed when done)."""
    from study.report.build import ablation_report  # the report draws with matplotlib: load it only now

    if stop_requested():  # Ctrl+C / SIGTERM: Tune ended the running trials itself; interrupted, not done
        records = [replace(record, live=None) if record.live is False else record for record in records]
    trials = ablation_table(records, plan.jobs, plan.study.train.epochs)
    csv = ablation_dir / RESULTS_FILE
    trials.to_csv(csv, index=False)
    interrupted = not is_finished(trials, len(plan.rows) * len(plan.seeds))
    study = plan.study
    meta = ablation_dir / ABLATION_FILE  # again: --tune-rows filled in each row's values since prepare()
    try:
        with tracking_buffer.short_retries():
            # The tables, the forest plot and the HTML page, logged to the parent run with the table
            # as its description: exactly what `study report DIR` rebuilds later.
            report = ablation_report(ablation_dir)
            log_outputs(study.tracking.uri, study.tracking.experiment, parent, [csv, meta], close=not interrupted)
    except Exception as err:  # MLflow went away by the end: the files are on disk, the close is kept
        if not tracking_buffer.outage(err):
            raise
        report = ablation_report(ablation_dir, log=False)
        line = tracking.close_parent(study.tracking.uri, study.tracking.experiment, ablation_dir, parent,
                                     None if interrupted else "FINISHED", [csv, meta, *report.files])
        print(line or f"MLflow was unreachable at the end: `python -m study report {ablation_dir}` logs the table")
    return AblationOutcome(ablation_dir, trials, report.markdown, report.files, interrupted, plan.source)
