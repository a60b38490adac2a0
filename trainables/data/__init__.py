"""Data: the precomp feature/caption layout, its validation, the synthetic benchmark and the loaders.

- :mod:`trainables.data.precomp` — ``PrecompSplit`` (memory-mapped), ``validate_split``, ``check_dataset``,
  ``check_eval_protocol``
- :mod:`trainables.data.loader`  — batch datasets, ``UniqueImageBatchSampler``, ``build_train_loader``,
  ``build_eval_loaders``, ``set_epoch``, ``device_batch`` (the batch contract of docs/architecture.md)
- :mod:`trainables.data.synth`   — ``write_synth``: the embedded benchmark
- :mod:`trainables.data.text_cache` — ``frozen_text``: a frozen text encoder's outputs, encoded once per
  split and memory-mapped (``TextFeatures``)
"""

from trainables.data.loader import (
    EvalLoaders,
    RandomBatchSampler,
    UniqueImageBatchSampler,
    build_eval_loaders,
    build_train_loader,
    device_batch,
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
from trainables.data.text_cache import TextFeatures, cached_text_features, frozen_text

__all__ = [
    "EvalLoaders", "PrecompSplit", "RandomBatchSampler", "SynthParams", "TextFeatures",
    "UniqueImageBatchSampler", "available_splits", "build_eval_loaders", "build_train_loader",
    "cached_text_features", "check_dataset", "check_eval_protocol", "describe", "device_batch", "frozen_text",
    "set_epoch", "split_files", "validate_split", "write_synth",
]
