"""Data: the precomp feature/caption layout, its validation, the synthetic benchmark and the loaders.

- :mod:`trainables.data.precomp` — ``PrecompSplit`` (memory-mapped), ``validate_split``, ``check_dataset``,
  ``check_eval_protocol``
- :mod:`trainables.data.loader`  — datasets, ``UniqueImageBatchSampler``, ``build_train_loader``,
  ``build_eval_loaders``, ``set_epoch`` (the batch contract of docs/architecture.md)
- :mod:`trainables.data.synth`   — ``write_synth``: the embedded benchmark
"""

from trainables.data.loader import (
    Collate,
    EvalLoaders,
    RandomBatchSampler,
    UniqueImageBatchSampler,
    build_eval_loaders,
    build_train_loader,
    set_epoch,
)
from trainables.data.precomp import (
    PrecompSplit,
    available_splits,
    check_dataset,
    check_eval_protocol,
    describe,
    split_files,
    validate_split,
)
from trainables.data.synth import SynthParams, write_synth

__all__ = [
    "Collate", "EvalLoaders", "PrecompSplit", "RandomBatchSampler", "SynthParams", "UniqueImageBatchSampler",
    "available_splits", "build_eval_loaders", "build_train_loader", "check_dataset", "check_eval_protocol",
    "describe", "set_epoch", "split_files", "validate_split", "write_synth",
]
