"""GPU layouts that Ray would place but training cannot use fail as one study-file line before Ray
starts (exit 2): DDP workers on fractions of a GPU (Ray puts them on one GPU, NCCL refuses with
"Duplicate GPU detected" while DDP is built, late and retried max_failures times), and shares above
one GPU that are not whole GPUs."""

from __future__ import annotations

import pytest

from study.cli import main
from study.config import ResourcesConfig
from tests.conftest import SMOKE

BAD = [
    (["resources.workers_per_trial=2", "resources.gpus_per_worker=0.5"],
     "resources.gpus_per_worker: 2 DDP workers on 0.5 GPU each would share one GPU"),
    (["resources.gpus_per_worker=1.5"], "resources.gpus_per_worker: 1.5 GPUs is neither a share of one GPU"),
    (["resources.gpus_per_worker=2.25", "resources.workers_per_trial=4"], "2.25 GPUs is neither"),
]


@pytest.mark.parametrize("command", ["run", "train"])
@pytest.mark.parametrize("sets, says", BAD)
def test_an_impossible_layout_is_one_line_and_exit_2_before_ray(command, sets, says, capsys, monkeypatch):
    import study.search
    import study.train

    for module in (study.search, study.train):
        monkeypatch.setattr(module, "connect", lambda *a, **k: pytest.fail("Ray must not start"))
    argv = [command, str(SMOKE)] + [arg for item in sets for arg in ("--set", item)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err


def test_the_layout_check_names_the_set_that_broke_it(tmp_path, capsys):
    """A file with half a GPU per worker is fine alone; the ``--set`` adding a second worker is blamed."""
    path = tmp_path / "study.yaml"
    path.write_text(SMOKE.read_text() + "resources: {workers_per_trial: 1, gpus_per_worker: 0.5}\n")
    assert main(["run", str(path), "--set", "resources.workers_per_trial=2"]) == 2
    assert capsys.readouterr().err.startswith("error: --set resources.workers_per_trial=2: ")


@pytest.mark.parametrize("layout", [
    {"gpus_per_worker": 0.5},                              # fractional trials share a GPU, one process each
    {"workers_per_trial": 2, "gpus_per_worker": 1},
    {"workers_per_trial": 2, "use_gpu": True},
    {"gpus_per_worker": 2},
    {"workers_per_trial": 4, "gpus_per_worker": 0},
])
def test_possible_layouts_pass(layout):
    ResourcesConfig(**layout)
