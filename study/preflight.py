"""Checks the driver runs before Ray starts, so bad input fails in one line with nothing written."""

from __future__ import annotations

from trainables.config import DataConfig
from trainables.data import check_eval_protocol, split_files, validate_split

FULL_SCAN_BYTES = 2 * 2**30  # NaN/inf scan of larger splits is left to `study data check` (minutes on COCO)


def check_data(data: DataConfig) -> None:
    """Every split the job reads exists and is well formed; small splits are scanned for NaN/inf."""
    for split in dict.fromkeys(s for s in (data.train_split, data.val_split, data.test_split) if s):
        ims = split_files(data.root, split).ims
        small = ims.is_file() and ims.stat().st_size <= FULL_SCAN_BYTES
        validate_split(data.root, split, scan_features=small)
    check_eval_protocol(data)
