"""Bad input, as a careless user gives it: one line on stderr naming what and where, exit code 2,
nothing written, Ray never started (issue 14's table, run through the real CLI in-process); a
study-file error costs no torch, Ray or pandas import; ``run --restart`` moves a study aside only
once every check has passed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from study.cli import main
from tests.conftest import ROOT, SMOKE


def smoke_file(tmp: Path, text: str) -> str:
    """``studies/smoke.yaml`` plus ``text`` (later keys win), as a new study file."""
    path = tmp / "study.yaml"
    path.write_text(SMOKE.read_text() + text)
    return str(path)


def empty_file(path: Path) -> str:
    path.write_text("")
    return str(path)


def space_file(tmp: Path, text: str) -> str:
    path = tmp / "space.yaml"
    path.write_text(text)
    return str(path)


def mixed_dims(tmp: Path, synth: Path) -> str:
    """A dataset whose dev features are 128-d while train and test are 256-d."""
    root = tmp / "mixed"
    shutil.copytree(synth, root)
    np.save(root / "dev_ims.npy", np.zeros((100, 12, 128), np.float32))
    return str(root)


def study_dir(tmp: Path, stored: str) -> str:
    folder = tmp / "results" / "old"
    folder.mkdir(parents=True)
    (folder / "study.yaml").write_text(stored)
    (folder / "space.yaml").write_text("method: base\nparams: {train.lr: {type: uniform, low: 0.1, high: 0.2}}\n")
    (folder / "mlflow_parent.json").write_text('{"run_id": "x"}')
    return str(folder)


def existing_study(tmp: Path) -> None:
    """A started study named ``smoke`` in the results folder the table uses."""
    (tmp / "results" / "smoke").mkdir(parents=True)
    (tmp / "results" / "smoke" / "mlflow_parent.json").write_text('{"run_id": "x"}')


def failed_train_run(tmp: Path) -> None:
    (tmp / "results" / "smoke-train-20260101-000000").mkdir(parents=True)
    (tmp / "results" / "smoke-train-20260101-000000" / ".validate_storage_marker").write_text("")


# (case id, argv from (tmp, synth_root), what stderr must say, where it must say it was)
CASES = [
    ("cross-split-dims", lambda t, s: ["train", SMOKE, "--set", f"data.root={mixed_dims(t, s)}"],
     "differ in dimension", "dev_ims.npy 128"),
    ("text-encoder-missing", lambda t, s: ["train", SMOKE, "--set", f"model.text_encoder={t / 'no-bert'}"],
     "model.text_encoder", "no-bert"),
    ("sqlite-two-slashes", lambda t, s: ["train", SMOKE, "--set", "tracking.uri=sqlite://m.db"],
     "three slashes", "sqlite://m.db"),
    ("sqlite-folder-under-a-file", lambda t, s: ["run", SMOKE, "--set", f"tracking.uri=sqlite:///{SMOKE}/m.db"],
     "is a file", "tracking.uri"),
    ("tracking-server-down", lambda t, s: ["train", SMOKE, "--set", "tracking.uri=http://127.0.0.1:9"],
     "no MLflow server answers", "127.0.0.1:9"),
    ("storage-under-proc-train", lambda t, s: ["train", SMOKE, "--set", "storage.path=/proc/itm-results"],
     "cannot write", "storage.path"),
    ("storage-under-proc-ablate", lambda t, s: ["ablate", SMOKE, "--set", "storage.path=/proc/itm-results"],
     "cannot write", "storage.path"),
    ("storage-is-a-file", lambda t, s: ["run", SMOKE, "--set", f"storage.path={SMOKE}"],
     "is a file", "storage.path"),
    ("int-log-low-0", lambda t, s: ["run", SMOKE, "--set", "search.space=" + space_file(
        t, "params: {train.epochs: {type: int, low: 0, high: 3, log: true}}\n")],
     "low >= 1", "space.yaml"),
    ("int-range-of-10M-values", lambda t, s: ["run", SMOKE, "--set", "search.space=" + space_file(
        t, "params:\n  train.eval_batch_size: {type: int, low: 1, high: 10000000}\n"
           "  train.loss: {type: categorical, choices: [triplet, hinge]}\n")],
     "train.loss='hinge'", "space.yaml"),
    ("log-on-a-float", lambda t, s: ["run", SMOKE, "--set", "search.space=" + space_file(
        t, "params: {train.lr: {type: uniform, low: 0.1, high: 0.2, log: true}}\n")],
     "use type: loguniform", "space.yaml"),
    ("grid-over-a-huge-int", lambda t, s: ["run", SMOKE, "--set", "search.algorithm=grid", "--set",
                                           "search.space=" + space_file(
        t, "params: {train.eval_batch_size: {type: int, low: 1, high: 10000000}}\n")],
     "grid search needs 'values'", "train.eval_batch_size"),
    ("space-for-another-method", lambda t, s: ["run", SMOKE, "--set", "search.space=" + space_file(
        t, "method: dias\nparams: {train.lr: {type: uniform, low: 0.1, high: 0.2}}\n")],
     "is for method 'dias'", "space.yaml"),
    ("empty-space-file", lambda t, s: ["run", SMOKE, "--set", "search.space=" + space_file(t, "")],
     "is empty", "space.yaml"),
    ("misspelt-metric", lambda t, s: ["run", SMOKE, "--set", "search.metric=r_sum"],
     "'r_sum' is not a metric", "--set search.metric=r_sum"),
    ("non-string-top-level-key", lambda t, s: ["train", smoke_file(t, "1: 2\n")],
     "key 1 is not a name", "study.yaml"),
    ("epochs-yes", lambda t, s: ["train", smoke_file(t, "train: {epochs: yes}\n")],
     "YAML boolean", "study.yaml: train.epochs"),
    ("batch-size-on-via-set", lambda t, s: ["train", SMOKE, "--set", "train.batch_size=on"],
     "YAML boolean", "--set train.batch_size=on"),
    ("set-blamed-not-the-file", lambda t, s: ["train", SMOKE, "--set", "train.epochs=lots"],
     "train.epochs", "--set train.epochs=lots"),
    ("set-method-cross-check", lambda t, s: ["run", SMOKE, "--set", "method=clip"],
     "unknown method 'clip'", "--set method=clip"),
    ("set-empty-key", lambda t, s: ["train", SMOKE, "--set", "=3"],
     "expected section.key=value", "--set '=3'"),
    ("set-no-equals", lambda t, s: ["train", SMOKE, "--set", "train.epochs"],
     "expected section.key=value", "--set"),
    ("empty-study-file", lambda t, s: ["run", empty_file(t / "study.yaml")],
     "is empty", "study.yaml"),
    ("unknown-key", lambda t, s: ["train", smoke_file(t, "bogus: 1\n")],
     "unknown key 'bogus'", "study.yaml"),
    ("resume-empty-study-yaml", lambda t, s: ["resume", study_dir(t, "")],
     "is empty", "study.yaml"),
    ("resume-a-file", lambda t, s: ["resume", str(SMOKE)],
     "is a file; resume takes a study directory", "smoke.yaml"),
    ("train-resume-without-checkpoint", lambda t, s: failed_train_run(t) or ["train", SMOKE, "--resume"],
     "no smoke-train-* run with a checkpoint", "results"),
    ("synth-out-is-a-file", lambda t, s: ["data", "synth", "--out", str(SMOKE)],
     "is a file", "--out"),
    ("synth-onto-a-dataset", lambda t, s: ["data", "synth", "--out", str(s)],
     "not empty", "--force"),
    ("study-exists", lambda t, s: existing_study(t) or ["run", SMOKE],
     "already exists", "--restart"),
    ("restart-with-a-bad-space", lambda t, s: existing_study(t) or ["run", SMOKE, "--restart", "--set",
                                                                   "search.space=" + space_file(
        t, "params: {train.epochs: {type: int, low: 0, high: 3, log: true}}\n")],
     "low >= 1", "space.yaml"),  # and the old study is not moved: nothing under tmp changes
]

# Ray "starts" on a fake cluster of one 2-CPU node (study/ray_session.py): what no node could hold is
# refused before anything is written, and an address where nothing listens fails before ray.init.
FAKE_CLUSTER = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
CONNECT_CASES = [
    ("use-gpu-on-a-cpu-cluster", lambda t, s: ["run", SMOKE, "--set", "resources.use_gpu=true"],
     "no node of this Ray cluster has a GPU", "resources.use_gpu"),
    ("gpus-per-worker-on-a-cpu-cluster", lambda t, s: ["train", SMOKE, "--set", "resources.gpus_per_worker=1"],
     "no node of this Ray cluster has a GPU", "resources.gpus_per_worker 1"),
    ("cpus-beyond-any-node", lambda t, s: ["run", SMOKE, "--set", "resources.cpus_per_worker=4"],
     "largest node of this Ray cluster has 2 CPUs", "resources.cpus_per_worker 4"),
    ("workers-beyond-the-cluster", lambda t, s: ["train", SMOKE, "--set", "resources.workers_per_trial=4"],
     "holds 2", "resources.workers_per_trial 4"),
    ("ray-address-nothing-listens", lambda t, s: ["run", SMOKE, "--address", "127.0.0.1:1"],
     "nothing answers at 127.0.0.1:1", "RAY_ADDRESS"),
]


@pytest.fixture
def no_ray(monkeypatch):
    import study.ablation.run
    import study.search
    import study.train

    for module in (study.search, study.train, study.ablation.run):
        monkeypatch.setattr(module, "connect", lambda *a, **k: pytest.fail("Ray must not start on bad input"))


@pytest.fixture
def fake_cluster(monkeypatch):
    """``ray`` as ``study/ray_session.py`` sees it: a local start that starts nothing, on FAKE_CLUSTER."""
    import signal

    from study import ray_session

    def init(address=None, **kwargs):
        if address:
            pytest.fail(f"ray.init({address!r}) must not run: nothing listens there")

    monkeypatch.setattr(ray_session, "ray", SimpleNamespace(is_initialized=lambda: False, init=init,
                                                           nodes=lambda: FAKE_CLUSTER))
    monkeypatch.delenv(ray_session.AUTOSCALING_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("TUNE_DISABLE_SIGINT_HANDLER", raising=False)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # connect() installs its own
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def files_under(*roots: Path) -> set[Path]:
    return {path for root in roots for path in root.rglob("*")}


@pytest.mark.parametrize("argv, says, where", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, says, where, synth_root, tmp_path, monkeypatch,
                                                         capsys, no_ray):
    check_bad_input(argv, says, where, synth_root, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("argv, says, where", [case[1:] for case in CONNECT_CASES],
                         ids=[case[0] for case in CONNECT_CASES])
def test_a_study_the_cluster_cannot_hold_is_one_line_exit_2_and_writes_nothing(argv, says, where, synth_root,
                                                                              tmp_path, monkeypatch, capsys,
                                                                              fake_cluster):
    check_bad_input(argv, says, where, synth_root, tmp_path, monkeypatch, capsys)


def check_bad_input(argv, says, where, synth_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [str(part) for part in argv(tmp_path, synth_root)]
    if args[0] in ("train", "run", "ablate"):  # a valid base: the shared data, results and MLflow in tmp_path
        args += ["--set", f"data.root={synth_root}"] if not any("data.root" in a for a in args) else []
        args += ["--set", f"storage.path={tmp_path / 'results'}"] if not any("storage." in a for a in args) else []
        args += ["--set", f"tracking.uri=sqlite:///{tmp_path / 'mlruns.db'}"] if not any(
            "tracking." in a for a in args) else []
    before = files_under(tmp_path, synth_root)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert says in err and where in err, err
    assert "(top level)" not in err
    assert files_under(tmp_path, synth_root) == before  # no study folder, no mlruns.db, no data overwritten
    assert not Path("/proc/itm-results").exists()


def test_the_table_covers_each_case_once():
    cases = CASES + CONNECT_CASES
    assert len({case[0] for case in cases}) == len(cases) >= 36


BAD_STUDY_FILES = {
    "unknown-key": "bogus: 1\n",
    "unknown-method": "method: clip\n",
    "bad-space": "search: {params: {train.epochs: {type: int, low: 0, high: 3, log: true}}}\n",
}
HEAVY = ("torch", "ray", "pandas", "mlflow", "optuna")


@pytest.mark.parametrize("entry", ["load_study", "cli"])
@pytest.mark.parametrize("name", sorted(BAD_STUDY_FILES))
def test_a_bad_study_file_fails_before_torch_ray_or_pandas_load(name, entry, tmp_path):
    """Cheap failures: the method registry, the schema and the search-space checks need none of them
    (a fresh interpreter, so nothing another test imported counts)."""
    bad = smoke_file(tmp_path, BAD_STUDY_FILES[name])
    calls = {
        "load_study": "from study.config import load_study\nfrom study.spaces import resolve_space\n"
                      "from trainables.errors import ConfigError\n"
                      f"try:\n    resolve_space(load_study({bad!r}))\n"
                      "except ConfigError as err:\n    print('error:', err)",
        "cli": f"from study.cli import main\nprint('rc', main(['run', {bad!r}]))",
    }
    probe = f"{calls[entry]}\nimport sys\nprint('loaded', [m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert "error:" in output and ("rc 2" in output) == (entry == "cli"), output
    assert "loaded []" in output, output


def test_train_resume_skips_runs_that_never_checkpointed(smoke_study):
    from study.train import run_name

    study = smoke_study()
    storage = Path(study.storage.path)
    (storage / "smoke-train-20260101-000000" / "checkpoint_2026-01-01_00-05-00.000000").mkdir(parents=True)
    (storage / "smoke-train-20260102-000000").mkdir()  # failed before its first checkpoint: a marker only
    assert run_name(study, resume=True) == "smoke-train-20260101-000000"


@pytest.mark.parametrize("metric", ["rsum", "t2i_r10", "loss", "loss_align", "budget/align", "uniformity_img"])
def test_every_reported_metric_is_a_valid_search_metric(smoke_study, metric):
    assert smoke_study(f"search.metric={metric}").search.metric == metric


def test_run_restart_moves_the_old_study_aside_only_once_every_check_passed(synth_root, tmp_path, monkeypatch,
                                                                          capsys):
    import study.search as search

    existing_study(tmp_path)
    old = tmp_path / "results" / "smoke"
    steps = []

    class Started(Exception):
        """Stands for the search itself: prepare() would write the new study here."""

    def prepare(study, params):
        steps.append(("prepare", old.exists()))
        raise Started

    monkeypatch.setattr(search, "connect", lambda address, resources: steps.append("connect"))
    monkeypatch.setattr(search, "prepare", prepare)
    with pytest.raises(Started):
        main(["run", str(SMOKE), "--restart", "--set", f"data.root={synth_root}", "--set",
              f"storage.path={tmp_path / 'results'}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    moved = list(old.parent.glob("smoke.old-*"))
    assert steps == ["connect", ("prepare", False)]  # connected and checked first, then moved, then started
    assert len(moved) == 1 and (moved[0] / "mlflow_parent.json").read_text() == '{"run_id": "x"}'
    said = capsys.readouterr().out.strip()
    assert said == f"restart: moved the earlier study folder {old} aside to {moved[0].name}"


def test_move_aside_never_overwrites_an_earlier_move(tmp_path):
    from study.layout import move_aside

    targets = []
    for marker in ("first", "second"):
        (tmp_path / "smoke").mkdir()
        (tmp_path / "smoke" / marker).write_text("")
        targets.append(move_aside(tmp_path / "smoke"))
    assert len(set(targets)) == 2 and all((t / m).exists() for t, m in zip(targets, ("first", "second")))
    assert move_aside(tmp_path / "smoke") is None  # nothing there: nothing to move
