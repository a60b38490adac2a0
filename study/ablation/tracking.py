"""MLflow for an ablation: one parent run, one child run per row × seed (``TrialRuns`` with
row-aware run names, params and tags), and the finished table shown on the parent (``publish_table``).

In the MLflow UI: the parent's description holds the table, its metric columns hold each row's
mean rSum, and "Group by" on the children's ``ablation.variant`` param (or ``variant`` tag) draws each
row's mean curve over its seeds (``docs/mlflow-ui.md``).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from study import tracking


def row_params(plan) -> dict[str, dict[str, str]]:
    """Per row the flat params its child runs log: data/model/train, the row's method and section."""
    params = {}
    for name, job in plan.jobs.items():
        flat = tracking.flatten({k: job[k] for k in ("method", "data", "model", "train")})
        flat.update(tracking.flatten({job["method"]: job["method_params"]}))
        params[name] = flat
    return params


class AblationRuns(tracking.TrialRuns):
    """Children named ``<row> seed=<s>`` and tagged with variant, seed and the row's own method
    (the base row runs ``base`` inside a DIAS ablation). Completion and failure tags are inherited."""

    def __init__(self, plan, parent_run_id: str):
        study = plan.study
        super().__init__(study.tracking.uri, study.tracking.experiment, parent_run_id, study.name,
                         study.method, {}, study.train.epochs)
        self.row_params = row_params(plan)
        self.row_methods = {name: job["method"] for name, job in plan.jobs.items()}

    def run_name(self, config: dict, number: int) -> str:
        return f"{config['variant']} seed={int(config['seed'])}"

    def trial_tags(self, config: dict) -> dict[str, str]:
        variant = config["variant"]
        return {"kind": "ablation-trial", "method": self.row_methods[variant], "variant": variant,
                "seed": str(int(config["seed"]))}

    def trial_params(self, config: dict) -> dict[str, str]:
        variant = config["variant"]
        return {**self.row_params[variant], "train.seed": str(int(config["seed"])),
                "ablation.variant": variant}


def start_parent_run(plan, ablation_dir: Path, files: list[Path]) -> str:
    """The ablation's parent run: the resolved study, rows, seeds and (``--from-study``) the source."""
    tags = {"variants": ", ".join(r.name for r in plan.rows), "seeds": ", ".join(map(str, plan.seeds))}
    if "from_study" in plan.source:
        tags.update({"from_study": plan.source["from_study"], "from_trial_id": plan.source["trial_id"]})
    if "tune_rows" in plan.source:  # every row searched on its own (ablate --tune-rows)
        tags["tune_rows"] = str(plan.source["tune_rows"])
    return tracking.start_parent_run(plan.study, plan.name, "ablation", ablation_dir, files, tags)


def log_outputs(uri: str, experiment: str, parent: str, files: list[Path], close: bool) -> None:
    """Attach the per-trial results and the three table formats; close the parent when finished."""
    client, _ = tracking.client_for(uri, experiment)
    for path in files:
        client.log_artifact(parent, str(path))
    if close:
        client.set_terminated(parent, "FINISHED")


CURVES = "^(rsum|loss)$"  # the per-epoch charts the curves view keeps (validation rSum, training loss)
PAD = "&nbsp;&nbsp;"  # MLflow's description renders table cells without padding


def row_metrics(table: pd.DataFrame) -> dict[str, float]:
    """``{"rsum/<row>": mean rSum}`` from the table's CSV (``ablation.csv``: one line per block ×
    row, in table order); with several blocks ``rsum/<block>/<row>``. Same numbers as the table."""
    several = table["block"].nunique() > 1
    return {"/".join(["rsum", line.block, line.variant] if several else ["rsum", line.variant]):
            float(line.rsum_mean) for line in table.itertuples()}


def views(parent_run_id: str, study_name: str, metric_keys: list[str]) -> dict[str, dict]:
    """The two runs-page views an ablation links to (``tracking.share_view`` states):

    - ``table``: this ablation's runs, the parent's per-row metrics as columns;
    - ``curves``: its row × seed runs grouped by the ``ablation.variant`` param, so each row's chart
      line is the mean over its seeds (with the min–max band), charts filtered to ``CURVES``.

    Grouping by the param rather than the ``variant`` tag: the UI colours a group by a hash of
    ``"<mode>.<key>.<value>"``, and with the tag three of DIAS's seven rows hash to the same green."""
    name = f'"{study_name}"' if "'" in study_name else f"'{study_name}'"  # MLflow's search takes either quote
    columns = [f"metrics.`{key}`" for key in metric_keys]
    widths = {column: 8 * len(key) + 24 for column, key in zip(columns, metric_keys)}  # headers not cut
    children = f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.kind = 'ablation-trial'"
    return {
        "table": {"searchFilter": f"tags.study = {name} and tags.kind LIKE 'ablation%'",
                  "selectedColumns": columns, "columnOrder": columns, "columnWidths": widths,
                  "runsHiddenMode": "SHOW_ALL"},
        "curves": {"searchFilter": children,
                   "groupBy": {"aggregateFunction": "average",
                               "groupByKeys": [{"mode": "param", "groupByData": "ablation.variant"}]},
                   "runsHiddenMode": "SHOW_ALL", "chartsSearchFilter": CURVES},
    }


def padded(markdown: str) -> str:
    """``markdown`` with ``PAD`` after every table cell (header and body, not the rule line)."""
    lines = []
    for line in markdown.splitlines():
        if line.startswith("|") and not set(line) <= set("|:- "):
            cells = re.split(r"(?<!\\)\|", line)[1:-1]
            line = "|" + "|".join(f"{cell.rstrip()}{PAD} " for cell in cells) + "|"
        lines.append(line)
    return "\n".join(lines)


def description(markdown: str, links: dict[str, str], images: list[str], run_id: str) -> str:
    """The parent's description: links to the views, the table and caption, the images (artifacts of
    this run at its root, shown through the UI's ``get-artifact`` address)."""
    parts = [" · ".join(f"[{label}]({target})" for label, target in links.items()), padded(markdown)]
    parts += [f"![{name}](get-artifact?path={quote(name)}&run_uuid={run_id})" for name in images]
    return "\n\n".join(parts) + "\n"


def publish_table(uri: str, experiment: str, parent_run_id: str, markdown: str, table_csv: Path,
                  images: list[Path] = ()) -> dict[str, str]:
    """Show a finished table on the ablation's parent run in the MLflow UI: each row's mean rSum as a
    metric (a column of the runs table without expanding), ``images`` (the forest plot) as artifacts
    at the run's root, two shared views (``views``) and a description (``mlflow.note.content``) with
    links to them, the Markdown table and caption, and the images. Calling it again (``study report``)
    replaces the description and views. Returns the views' UI addresses (``tracking.ui_path``)."""
    client, experiment_id = tracking.client_for(uri, experiment)
    metrics = row_metrics(pd.read_csv(table_csv, dtype={"variant": str, "block": str}))
    tracking.log_summary(client, parent_run_id, metrics)
    for path in images:
        client.log_artifact(parent_run_id, str(path))
    study_name = client.get_run(parent_run_id).data.tags.get("study", "")
    paths = {}
    for name, state in views(parent_run_id, study_name, [tracking.metric_key(k) for k in metrics]).items():
        key = f"ablation-{parent_run_id}-{name}"
        tracking.share_view(client, experiment_id, key, state)
        paths[name] = tracking.ui_path(experiment_id, view=key, charts=name == "curves")
    links = {"Rows as columns of the runs table": paths["table"],
             "Each row's mean curve over its seeds": paths["curves"]}
    text = description(markdown, links, [Path(p).name for p in images], parent_run_id)
    full_table = Path(table_csv).with_suffix(".md").name
    tracking.set_description(client, parent_run_id, text, more=f"the artifact {full_table}")
    return paths
