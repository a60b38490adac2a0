"""Terminal output shared by the commands."""

from __future__ import annotations

RETRIEVAL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def print_metrics(metrics: dict[str, float], title: str) -> None:
    """Validation (and test, when present) retrieval metrics as a small aligned table."""
    print(title)
    rows = [("val", "")]
    if any(f"test_{key}" in metrics for key in RETRIEVAL_KEYS):
        rows.append(("test", "test_"))
    print(f"{'split':<6}" + "".join(f"{key:>9}" for key in RETRIEVAL_KEYS))
    for label, prefix in rows:
        cells = "".join(f"{metrics.get(prefix + key, float('nan')):>9.1f}" for key in RETRIEVAL_KEYS)
        print(f"{label:<6}{cells}")
