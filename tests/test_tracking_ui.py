"""What the MLflow UI shows of a study: training experiments, the ablation table in the parent run's
description, one metric column per row, the shared views the description links to, and children that
"Group by" can split into rows. A sqlite store in tmp_path; no Ray, no browser
(``docs/mlflow_screenshots.py`` checks the same in Chromium)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from study import tracking
from study.ablation.output import write_tables
from study.ablation.tracking import PAD, AblationRuns, padded, publish_table, row_metrics, views

ROWS = ["full", "w/o L_dim", "base"]
RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
RSUM = {"full": [120.0, 124.0, 122.0], "w/o L_dim": [110.0, 112.0, 113.0], "base": [90.0, 95.0, 91.0]}


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns.db'}"


def trials() -> pd.DataFrame:
    """Completed trials of three rows × three seeds on a test split (final-epoch metrics)."""
    lines = []
    for variant, values in RSUM.items():
        for seed, total in enumerate(values):
            cells = {f"test_{m}": total / 6 for m in RECALLS}
            lines.append({"trial_id": f"{variant}-{seed}", "variant": variant, "seed": seed,
                          "status": "completed", "epochs": 2, **cells, "test_rsum": total})
    return pd.DataFrame(lines)


def table_files(tmp_path: Path) -> tuple[str, Path]:
    """The real ``ablation.md`` / ``ablation.csv`` of ``trials()`` (what ``finish`` passes on)."""
    meta = {"name": "ui", "study": "ui", "method": "dias", "dataset": "synth", "rows": ROWS,
            "seeds": [0, 1, 2], "epochs": 2, "select": "final", "source": {}}
    markdown, files = write_tables(trials(), meta, tmp_path)
    return markdown, files[2]


def parent_run(store: str, study: str = "ui") -> tuple[MlflowClient, str, str]:
    client, experiment_id = tracking.client_for(store, "itm-study")
    tags = {"study": study, "kind": "ablation"}
    run = client.create_run(experiment_id, run_name=f"{study}-ablation", tags=tags)
    return client, experiment_id, run.info.run_id


def table_cells(markdown: str) -> list[list[str]]:
    """Every table line's cells, stripped, with the description's padding removed."""
    return [[cell.replace(PAD, "").strip() for cell in line.split("|")[1:-1]]
            for line in markdown.splitlines() if line.startswith("|") and not set(line) <= set("|:- ")]


def test_a_new_experiment_is_a_training_experiment(store):
    client, experiment_id = tracking.client_for(store, "fresh")
    kind = client.get_experiment(experiment_id).tags[tracking.EXPERIMENT_KIND_TAG]
    assert kind == "custom_model_development"  # the UI's "Machine learning"


def test_a_reused_experiment_gets_the_kind_only_when_it_has_none(store):
    plain = MlflowClient(store)
    bare = plain.create_experiment("made-elsewhere")
    genai = plain.create_experiment("chosen", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking.client_for(store, "made-elsewhere")
    tracking.client_for(store, "chosen")
    assert plain.get_experiment(bare).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND
    assert plain.get_experiment(genai).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_publish_table_puts_the_table_metrics_plot_and_views_on_the_parent(store, tmp_path):
    markdown, csv = table_files(tmp_path)
    plot = tmp_path / "forest.png"
    plot.write_bytes(b"\x89PNG\r\n\x1a\n not really drawn")
    client, experiment_id, parent = parent_run(store)
    paths = publish_table(store, "itm-study", parent, markdown, csv, [plot])

    run = client.get_run(parent)
    note = run.data.tags["mlflow.note.content"]
    assert table_cells(note) == table_cells(markdown)  # the same table, cell for cell
    assert markdown.strip().splitlines()[-1] in note  # and its caption
    assert f"get-artifact?path=forest.png&run_uuid={parent}" in note  # the plot, shown inline
    assert [a.path for a in client.list_artifacts(parent)] == ["forest.png"]
    for row, values in RSUM.items():  # one column per row: the row's mean rSum, as in the table
        assert run.data.metrics[f"rsum/{row}"] == pytest.approx(sum(values) / 3, abs=1e-3)

    tags = client.get_experiment(experiment_id).tags
    for name, path in paths.items():
        key = f"ablation-{parent}-{name}"
        assert f"viewStateShareKey={key}" in path and tracking.UI_TRAINING in path and f"]({path})" in note
        stored = json.loads(tags[tracking.SHARED_VIEW_PREFIX + key])
        assert stored == views(parent, "ui", [f"rsum/{r}" for r in ROWS])[name]


def test_publishing_again_replaces_the_description(store, tmp_path):
    markdown, csv = table_files(tmp_path)
    client, _, parent = parent_run(store)
    publish_table(store, "itm-study", parent, "| old |\n|---|\n| 1 |\n", csv)
    publish_table(store, "itm-study", parent, markdown, csv)
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert "old" not in note and table_cells(note) == table_cells(markdown)


def test_the_views_search_what_the_runs_carry(store, tmp_path):
    """The table view's filter finds the parent and its children and nothing of another study; the
    curves view's filter finds exactly the row × seed runs, and they all have its group-by param."""
    client, experiment_id, parent = parent_run(store, study="it's")
    other = parent_run(store, study="other")[2]
    plan = SimpleNamespace(study=SimpleNamespace(tracking=SimpleNamespace(uri=store, experiment="itm-study"),
                                                 name="it's", method="dias", train=SimpleNamespace(epochs=2)),
                           jobs={r: {"method": "base" if r == "base" else "dias", "data": {}, "model": {},
                                     "train": {"lr": 0.001}, "method_params": {}} for r in ROWS})
    runs = AblationRuns(plan, parent)
    for number, (row, seed) in enumerate([(r, s) for r in ROWS for s in (0, 1)]):
        runs.started(f"t{number}", {"variant": row, "seed": seed})
    state = views(parent, "it's", ["rsum/full"])

    found = client.search_runs([experiment_id], state["table"]["searchFilter"])
    assert {r.info.run_id for r in found} == {parent, *runs.runs.values()} and other not in found
    children = client.search_runs([experiment_id], state["curves"]["searchFilter"])
    assert {r.info.run_id for r in children} == set(runs.runs.values())
    key = state["curves"]["groupBy"]["groupByKeys"][0]["groupByData"]
    assert sorted(r.data.params[key] for r in children) == sorted(ROWS * 2)
    assert sorted((r.data.tags["variant"], r.data.tags["seed"]) for r in children) == \
        sorted((r, str(s)) for r in ROWS for s in (0, 1))


def test_row_metrics_name_the_block_when_there_are_several():
    table = pd.DataFrame({"block": ["1k", "1k", "5k", "5k"], "variant": ["full", "base"] * 2,
                          "rsum_mean": [500.0, 480.0, 400.0, 380.0]})
    assert row_metrics(table) == {"rsum/1k/full": 500.0, "rsum/1k/base": 480.0,
                                  "rsum/5k/full": 400.0, "rsum/5k/base": 380.0}
    assert row_metrics(table[table["block"] == "5k"]) == {"rsum/full": 400.0, "rsum/base": 380.0}


def test_log_summary_keeps_keys_mlflow_accepts_and_skips_rows_without_a_result(store):
    client, _, parent = parent_run(store)
    metrics = {"rsum/w/o L_dim (x+y)": 1.5, "rsum//base": 2.0, "rsum/empty": math.nan}
    tracking.log_summary(client, parent, metrics)
    assert client.get_run(parent).data.metrics == {"rsum/w/o L_dim _x_y_": 1.5, "rsum/base": 2.0}


def test_a_too_long_description_is_cut_and_says_where_the_rest_is(store):
    client, _, parent = parent_run(store)
    tracking.set_description(client, parent, "x" * (tracking.MAX_NOTE_LEN + 500), more="ablation.md")
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert len(note) <= tracking.MAX_NOTE_LEN and note.endswith("the full text is in ablation.md)")


def test_padding_leaves_the_rule_line_and_text_alone():
    markdown = "**1K**\n\n| Variant | rSum |\n|:--|--:|\n| a \\| b | 1.0 |\n\nCaption | with a bar.\n"
    lines = padded(markdown).splitlines()
    assert lines[0] == "**1K**" and lines[3] == "|:--|--:|" and lines[-1] == "Caption | with a bar."
    assert lines[4] == f"| a \\| b{PAD} | 1.0{PAD} |"  # an escaped bar stays inside its cell


def test_ui_paths_open_the_training_view():
    assert tracking.ui_path("3") == "#/experiments/3/runs?workflowType=machine_learning"
    assert tracking.ui_path("3", run_id="abc") == "#/experiments/3/runs/abc?workflowType=machine_learning"
    assert tracking.ui_path("3", view="k v", charts=True) == \
        "#/experiments/3/runs?viewStateShareKey=k%20v&workflowType=machine_learning&compareRunsMode=CHART"
