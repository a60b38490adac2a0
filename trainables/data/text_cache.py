"""The frozen text encoder's outputs, computed once per split and memory-mapped (``model.freeze_text``).

A frozen encoder maps a caption to the same hidden states in every epoch of every trial, yet the
uncached path re-ran it for each training batch and each evaluation (most of the demo's time). Here
a split's captions are encoded once; loaders then yield the cached hidden states instead of token ids
and the model applies only the trainable rest of the text path (``TextEncoder.proj`` onwards).

Layout, one directory per key under ``<data root>/.cache/text/`` (or, when the data root is not
writable, ``$XDG_CACHE_HOME/itm-study/text/``)::

    <key>/hidden.npy   float32 [T, H]  last_hidden_state of every real token, captions in split order
    <key>/offsets.npy  int64   [n+1]   caption j is hidden[offsets[j]:offsets[j+1]]
    <key>/meta.json    what the key was computed from (for people; never read back)

Only real tokens are stored (no padding): ~15.7 tokens per synthetic caption at MiniLM's 384-d make
24 MB per 1,000 captions. float32 keeps the cached path equal to the uncached one; float16 would
halve that.

The key hashes everything the stored values depend on: the encoder's class, config and weights (so
``tiny``'s seed-dependent random weights get their own entry), the tokenizer's full definition, the
maximum length, and the caption file's bytes plus how many of its lines are used. Any change gives a
new directory; nothing is ever overwritten. A directory is written under a temporary name and
renamed into place while holding a per-key ``flock``, so concurrent trials on one node encode once,
and readers see either nothing or a complete entry; they share its pages through the page cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainables.config import JobConfig
from trainables.data.precomp import PrecompSplit, split_files
from trainables.errors import DataError

CACHE_VERSION = 1  # bump when the layout or what is stored changes
HASH_CHUNK_BYTES = 2**20
ENCODE_BATCH = 128  # captions per encoder call while filling the cache
FILES = ("hidden.npy", "offsets.npy", "meta.json")


class TextFeatures:
    """A split's cached hidden states: ``caption(j)`` -> ``[L_j, H]`` float32 (a view of the memmap).

    Pickling sends the directory and re-maps on arrival (a memmap would otherwise be copied whole
    into every DataLoader worker or Ray object).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.hidden = np.load(self.path / "hidden.npy", mmap_mode="r")
        self.offsets = np.load(self.path / "offsets.npy")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[1]

    def caption(self, j: int) -> np.ndarray:
        return self.hidden[self.offsets[j]:self.offsets[j + 1]]

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return f"TextFeatures({str(self.path)!r}, {len(self)} captions x {self.hidden_size}-d)"


# --------------------------------------------------------------------------------------------------
# The key
# --------------------------------------------------------------------------------------------------

_weights_digests: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _versions(module: nn.Module) -> tuple:
    """Storage and in-place version of every tensor: changes whenever a weight could have changed."""
    return tuple((t.data_ptr(), t._version) for t in module.state_dict().values())


def encoder_digest(backbone: nn.Module) -> str:
    """Hash of the encoder's class, config and every weight (memoised until a tensor changes:
    hashing MiniLM's 90 MB takes ~0.5 s here, and a run asks once per split)."""
    versions = _versions(backbone)
    memo = _weights_digests.get(backbone)
    if memo is not None and memo[0] == versions:
        return memo[1]
    h = hashlib.blake2b(digest_size=16)
    h.update(type(backbone).__qualname__.encode())
    config = getattr(backbone, "config", None)
    if config is not None:  # where the checkpoint was read from is not what it computes
        h.update(json.dumps({k: v for k, v in config.to_dict().items() if k != "_name_or_path"},
                            sort_keys=True, default=str).encode())
    for name, tensor in backbone.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    _weights_digests[backbone] = (versions, h.hexdigest())
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """Hash of the tokenizer's definition (normaliser, vocabulary, special tokens, post-processor).
    The backend's truncation and padding state is left out: every call of the tokenizer changes it."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(tokenizer).__qualname__}:{tokenizer.truncation_side}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(split: PrecompSplit, backbone: nn.Module, tokenizer, max_length: int) -> tuple[str, dict]:
    """``(key, parts)``: the directory name and the parts it hashes (written to meta.json)."""
    caps = split_files(split.root, split.split).caps
    parts = {"version": CACHE_VERSION, "encoder": encoder_digest(backbone),
             "tokenizer": tokenizer_digest(tokenizer), "max_length": max_length, "captions_file": str(caps),
             "captions_digest": file_digest(caps), "n_captions": split.n_captions}
    # The caption file's content, not its place: a copied dataset keeps its entries.
    described = {name: value for name, value in parts.items() if name != "captions_file"}
    key = hashlib.blake2b(json.dumps(described, sort_keys=True).encode(), digest_size=16).hexdigest()
    return f"{split.split}-{key}", parts


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def tokenize(tokenizer, captions: list[str], max_length: int) -> list[list[int]]:
    """Token ids per caption, exactly as ``Collate`` makes them (truncation at ``max_length``), unpadded."""
    return tokenizer(captions, truncation=True, max_length=max_length)["input_ids"]


@torch.no_grad()
def encode_into(hidden: np.ndarray, offsets: np.ndarray, ids: list[list[int]], backbone: nn.Module,
                device: torch.device, batch_size: int = ENCODE_BATCH) -> None:
    """Fill ``hidden [T, H]`` with ``backbone``'s last_hidden_state of each caption's real tokens.

    Captions are batched by length (little padding) and right-padded, so positions are 0..L-1 as in
    training. The backbone runs in eval mode (no dropout) in float32; its train flag is restored.
    """
    was_training = backbone.training
    backbone.eval()
    try:
        order = np.argsort([len(x) for x in ids], kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            longest = max(len(ids[j]) for j in rows)
            input_ids = torch.zeros(len(rows), longest, dtype=torch.int64)
            mask = torch.zeros(len(rows), longest, dtype=torch.int64)
            for r, j in enumerate(rows):
                input_ids[r, :len(ids[j])] = torch.tensor(ids[j])
                mask[r, :len(ids[j])] = 1
            out = backbone(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            out = out.float().cpu().numpy()
            for r, j in enumerate(rows):
                hidden[offsets[j]:offsets[j + 1]] = out[r, :offsets[j + 1] - offsets[j]]
    finally:
        backbone.train(was_training)


def write_entry(directory: Path, split: PrecompSplit, backbone: nn.Module, tokenizer, max_length: int,
                device: torch.device, parts: dict) -> None:
    """Encode ``split``'s captions into ``directory`` (streamed into a memmap: COCO-sized splits never
    sit in RAM)."""
    ids = tokenize(tokenizer, list(split.captions), max_length)
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64)
    hidden_size = backbone.config.hidden_size
    hidden = np.lib.format.open_memmap(directory / "hidden.npy", mode="w+", dtype=np.float32,
                                       shape=(int(offsets[-1]), hidden_size))
    encode_into(hidden, offsets, ids, backbone, device)
    hidden.flush()
    del hidden
    np.save(directory / "offsets.npy", offsets)
    meta = dict(parts, split=split.split, tokens=int(offsets[-1]), hidden_size=hidden_size, dtype="float32")
    (directory / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# Where the cache lives, and building it once
# --------------------------------------------------------------------------------------------------


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "itm-study" / "text"


def cache_dirs(root: Path) -> list[Path]:
    """Where entries may live, in order of preference: beside the data, then the user's cache."""
    return [Path(root) / ".cache" / "text", user_cache_dir()]


def complete(entry: Path) -> bool:
    return all((entry / name).is_file() for name in FILES)


def writable_dir(candidates: list[Path]) -> Path:
    """The first candidate that exists or can be created, and can be written to."""
    for base in candidates:
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(base, os.W_OK | os.X_OK):
            return base
    raise DataError(f"no writable text-cache directory among {', '.join(map(str, candidates))}; set "
                    "XDG_CACHE_HOME to a writable directory or set model.cache_text: false")


@contextlib.contextmanager
def exclusive(lock_path: Path):
    """Hold an exclusive ``flock`` on ``lock_path`` (released when the process dies, so never stale);
    yields whether the lock is held. Where the file system has no locks (some NFS mounts) concurrent
    writers may both encode; the atomic rename in :func:`cached_text_features` still leaves one
    complete entry."""
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_leftovers(base: Path, key: str) -> None:
    """Delete half-written ``.<key>.tmp-*`` directories of encodes that were killed (SIGKILL, OOM, a
    lost node). Only called with the key's lock held, so no live writer owns one of them."""
    for leftover in base.glob(f".{key}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def publish(tmp: Path, entry: Path) -> None:
    """Rename the finished ``tmp`` to ``entry`` (atomic); if another writer got there first, keep theirs."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; entries are shared like the data beside them
    try:
        os.replace(tmp, entry)
    except OSError:
        if not complete(entry):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def cached_text_features(split: PrecompSplit, backbone: nn.Module, tokenizer, max_length: int,
                         device: torch.device) -> TextFeatures:
    """The split's frozen-encoder outputs, read from the cache or encoded once and stored there."""
    key, parts = cache_key(split, backbone, tokenizer, max_length)
    candidates = cache_dirs(split.root)
    for base in candidates:
        if complete(base / key):
            return TextFeatures(base / key)
    base = writable_dir(candidates)
    with exclusive(base / f".{key}.lock") as locked:
        if not complete(base / key):  # another process may have written it while we waited
            if locked:
                remove_leftovers(base, key)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=base))
            try:
                write_entry(tmp, split, backbone, tokenizer, max_length, device, parts)
                publish(tmp, base / key)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return TextFeatures(base / key)


def frozen_text(job: JobConfig, backbone: nn.Module, split: PrecompSplit, tokenizer,
                device: torch.device) -> TextFeatures | None:
    """The split's cached features when ``model.freeze_text`` and ``model.cache_text`` are on, else None
    (the loaders then tokenise and the model runs the encoder)."""
    if not (job.model.freeze_text and job.model.cache_text):
        return None
    return cached_text_features(split, backbone, tokenizer, job.data.max_text_len, device)
