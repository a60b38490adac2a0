"""Console progress lines (trainables/progress.py): one line per epoch with what a researcher reads."""

from __future__ import annotations

import io

from trainables.progress import Progress


def lines_of(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_one_line_per_epoch_names_the_trial_its_epoch_loss_rsum_and_seconds():
    out, now = io.StringIO(), [100.0]
    progress = Progress(lambda config, number: f"{config['variant']} seed={config['seed']}", total=12, epochs=3,
                        out=out, clock=lambda: now[0])
    progress.started("a", {"variant": "full", "seed": 0})
    progress.started("b", {"variant": "w/o L_dim", "seed": 1})
    now[0] = 114.4
    progress.reported("b", {"training_iteration": 1, "epoch": 1, "loss": 2.85113, "rsum": 141.23})
    now[0] = 120.0
    progress.reported("b", {"training_iteration": 2, "epoch": 2, "loss": 2.5, "rsum": 150.0})
    progress.completed("b", 2)
    progress.failed("a", "ValueError: boom")
    assert lines_of(out) == [
        "[ 1/12] full seed=0   started",
        "[ 2/12] w/o L_dim seed=1   started",
        "[ 2/12] w/o L_dim seed=1   epoch 1/3   loss 2.8511   val rSum 141.2   14 s",
        "[ 2/12] w/o L_dim seed=1   epoch 2/3   loss 2.5000   val rSum 150.0   6 s",
        "[ 2/12] w/o L_dim seed=1   stopped early by the scheduler after epoch 2",
        "[ 1/12] full seed=0   FAILED: ValueError: boom",
    ]


def test_a_search_start_line_shows_the_values_and_a_restart_keeps_the_number():
    out = io.StringIO()
    progress = Progress(lambda config, number: f"dias-{number:03d}", total=8, epochs=2, metric="gap_centroid_dist",
                        detail=lambda config: " ".join(f"{k}={v}" for k, v in config.items()), out=out,
                        clock=lambda: 0.0)
    progress.started("t1", {"lr": 0.001})
    progress.started("t1", {"lr": 0.001})  # retried after a failure
    progress.reported("t1", {"epoch": 2, "rsum": 99.0, "gap_centroid_dist": 0.123456})
    progress.completed("t1", 2)
    assert lines_of(out) == [
        "[1/8] dias-000   started   lr=0.001",
        "[1/8] dias-000   restarted   lr=0.001",
        "[1/8] dias-000   epoch 2/2   val rSum 99.0   gap_centroid_dist 0.1235   0 s",
        "[1/8] dias-000   done",
    ]


def test_a_trial_restored_mid_way_is_labelled_from_its_result_config():
    out = io.StringIO()
    progress = Progress(lambda config, number: f"{config.get('variant', '?')}", total=2, epochs=3, out=out,
                        clock=lambda: 0.0)
    progress.reported("x", {"epoch": 3, "loss": 1.0, "config": {"variant": "base"}})
    assert lines_of(out)[-1].startswith("[1/2] base   epoch 3/3   loss 1.0000")
    progress.completed("unknown", 3)  # events of trials never seen print nothing
    assert len(lines_of(out)) == 2
