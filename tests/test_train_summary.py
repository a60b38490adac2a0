"""`study train`'s summary: the final epoch's rows, and the best-validation epoch's only when it differs."""

from __future__ import annotations

from study.commands.train import metric_rows, print_metrics

RETRIEVAL = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def run_metrics(best_epoch: int, epoch: int = 3) -> dict[str, float]:
    metrics = {"epoch": epoch, "best_epoch": best_epoch}
    for prefix, value in (("", 1.0), ("test_", 2.0), ("best_", 3.0), ("best_test_", 4.0)):
        metrics.update({prefix + key: value for key in RETRIEVAL})
    return metrics


def test_an_earlier_best_epoch_gets_its_own_rows_and_says_so(capsys):
    assert metric_rows(run_metrics(best_epoch=2)) == [
        ("val", ""), ("test", "test_"), ("val@ep2", "best_"), ("test@ep2", "best_test_")]
    print_metrics(run_metrics(best_epoch=2), "demo")
    out = capsys.readouterr().out.splitlines()
    assert out[-3].startswith("val@ep2") and out[-3].split()[-1] == "3.0"
    assert out[-1] == "best validation rSum at epoch 2 of 3: rows @ep2 are that epoch's, the others the final epoch's"


def test_a_best_final_epoch_is_printed_once(capsys):
    assert metric_rows(run_metrics(best_epoch=3)) == [("val", ""), ("test", "test_")]
    print_metrics(run_metrics(best_epoch=3), "demo")
    assert capsys.readouterr().out.splitlines()[-1] == "best validation rSum at the final epoch (3)"
