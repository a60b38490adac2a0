"""Batch datasets, batch samplers and the move to the device, producing the batch contract of
docs/architecture.md.

Training batch (``build_train_loader``), one row per caption. The loader yields it on the host:

- ``images``         ``[B, R, D]`` in the feature file's dtype (float32 or float16), all regions
- ``region_mask``    ``[B, R]`` bool, all True
- ``input_ids``      ``[B, L]`` int64 — the text encoder's own tokenizer; or, given a frozen encoder's
  cache (``text=`` a :class:`~trainables.data.text_cache.TextFeatures`), its hidden states
  ``[B, L, H]`` float32, zero-padded on the right
- ``attention_mask`` ``[B, L]`` int64
- ``image_ids``      ``[B]`` int64 — index of the caption's image in its split (equal ids are positives)
- ``dropout_seed``   ``[]`` int64 — seed of this batch's region dropout (consumed by ``device_batch``)

:func:`device_batch` then moves it to the device, upcasts the features to float32 there and applies
region dropout there (kept regions moved to the front, zeros after, ``region_mask`` a prefix).
The loader this replaces copied each caption's image to float32, dropped its regions and stacked
the items on the host (4,439 samples/s at the BUTD shape against 10,228 now, one torch thread:
``python -m benchmarks.loader``); a batch is now gathered with one fancy index into the
memory-mapped features (``images[image_ids]``) in their stored dtype, and the copy to the GPU is
made from pinned memory when ``pin_memory`` is on.

Evaluation (``build_eval_loaders``) encodes the two sides separately, both in split order: an image
loader (``images`` float32, ``region_mask`` all True, ``image_ids``) and a caption loader
(``input_ids``, ``attention_mask``, ``image_ids``), so N image embeddings and k·N caption embeddings
line up with the 1K folds of ``trainables.evaluation.coco_5fold_metrics``. Their batches need no
``device_batch``.

All randomness (shuffling, region dropout) is a pure function of ``(seed, epoch, batch number)``, so
results do not depend on ``num_workers`` or on the global RNG; call :func:`set_epoch` before every
epoch. The seed of a batch travels with its indices from the sampler (main process), so persistent
workers need not learn the epoch.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from trainables.config import DataConfig
from trainables.data.precomp import PrecompSplit
from trainables.data.text_cache import TextFeatures
from trainables.errors import ConfigError


def _rng(*keys: int) -> np.random.Generator:
    """A generator fully determined by ``keys`` (negative seeds allowed)."""
    return np.random.default_rng([key % 2**63 for key in keys])


def batch_seed(seed: int, epoch: int, number: int) -> int:
    """The region-dropout seed of batch ``number`` (over all replicas) of ``epoch``."""
    return int(_rng(seed, epoch, number).integers(2**63))


# --------------------------------------------------------------------------------------- gathering


def gather_images(images: np.ndarray, image_ids: np.ndarray) -> torch.Tensor:
    """``images[image_ids]`` -> ``[B, R, D]`` in the stored dtype: one fancy index into the memmap,
    one copy."""
    return torch.from_numpy(images[image_ids])


def gather_hidden(text: TextFeatures, captions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached hidden states of ``captions`` -> right-padded ``[B, L, H]`` (stored dtype), ``[B, L]`` int64
    mask; one fancy index into the memmap (padding rows re-read a caption's last token, then zeroed)."""
    starts, lengths = text.offsets[captions], text.offsets[captions + 1] - text.offsets[captions]
    positions = np.arange(int(lengths.max()))
    mask = positions[None, :] < lengths[:, None]
    rows = starts[:, None] + np.minimum(positions[None, :], lengths[:, None] - 1)
    hidden = text.hidden[rows]
    hidden[~mask] = 0
    return torch.from_numpy(hidden), torch.from_numpy(mask.astype(np.int64))


def check_text(split: PrecompSplit, text: TextFeatures | None) -> None:
    if text is not None and len(text) != split.n_captions:
        raise ValueError(f"{text} has {len(text)} captions but split {split.split!r} uses {split.n_captions}")


class CaptionText:
    """The text side of a batch of captions: tokenised by the text encoder's tokenizer, or read from
    a frozen encoder's cache (``text``). A class rather than a closure so DataLoader workers can pickle it."""

    def __init__(self, split: PrecompSplit, tokenizer, max_length: int, text: TextFeatures | None = None):
        check_text(split, text)
        self.split, self.tokenizer, self.max_length, self.text = split, tokenizer, max_length, text

    def __call__(self, captions: np.ndarray) -> dict[str, torch.Tensor]:
        """``captions [B]`` -> ``input_ids``, ``attention_mask`` (see the module docstring)."""
        if self.text is not None:
            input_ids, attention_mask = gather_hidden(self.text, captions)
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        tokens = self.tokenizer([self.split.caption(int(j)) for j in captions], padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        return {"input_ids": tokens["input_ids"].long(), "attention_mask": tokens["attention_mask"].long()}


# ----------------------------------------------------------------------------------- batch datasets


class TrainBatches(Dataset):
    """Item ``(seed, captions)`` = the whole training batch of those caption indices with their images
    (keys in the module docstring; features in their stored dtype, no dropout yet)."""

    def __init__(self, split: PrecompSplit, text: CaptionText):
        self.split, self.text = split, text

    def __getitem__(self, item: tuple[int, list[int]]) -> dict[str, torch.Tensor]:
        seed, indices = item
        captions = np.asarray(indices, dtype=np.int64)
        image_ids = captions // self.split.captions_per_image
        images = gather_images(self.split.images, image_ids)
        return {"images": images, "region_mask": torch.ones(images.shape[:2], dtype=torch.bool),
                **self.text(captions), "image_ids": torch.from_numpy(image_ids),
                "dropout_seed": torch.tensor(seed, dtype=torch.int64)}


class EvalImages(Dataset):
    """Item ``indices`` = those images, all regions, float32 (``evaluate`` moves them as they are)."""

    def __init__(self, split: PrecompSplit):
        self.split = split

    def __len__(self) -> int:
        return self.split.n_images

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        image_ids = np.asarray(indices, dtype=np.int64)
        images = gather_images(self.split.images, image_ids).float()
        return {"images": images, "region_mask": torch.ones(images.shape[:2], dtype=torch.bool),
                "image_ids": torch.from_numpy(image_ids)}


class EvalCaptions(Dataset):
    """Item ``indices`` = those captions' text and ``image_ids``."""

    def __init__(self, split: PrecompSplit, text: CaptionText):
        self.split, self.text = split, text

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        captions = np.asarray(indices, dtype=np.int64)
        image_ids = torch.from_numpy(captions // self.split.captions_per_image)
        return {**self.text(captions), "image_ids": image_ids}


# ----------------------------------------------------------------------------- on the device


def drop_regions(images: torch.Tensor, region_mask: torch.Tensor, p: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Region dropout (VSE∞) on the device: each real region is dropped with probability ``p``; a row
    that would lose all of them keeps one, chosen uniformly. Kept regions move to the front (in their
    order), zeros fill the rest, and the mask becomes a prefix.

    ``images [B, R, D]``, ``region_mask [B, R]`` bool -> (``[B, R, D]``, ``[B, R]``). Masked arithmetic
    only: no host sync, no data-dependent shapes.
    """
    draws = torch.rand(region_mask.shape, generator=generator, device=images.device)
    keep = (draws >= p) & region_mask
    fallback = torch.rand(region_mask.shape, generator=generator, device=images.device)
    fallback = fallback.masked_fill(~region_mask, -1)  # the rescued region is a real one
    rescue = torch.zeros_like(keep).scatter_(1, fallback.argmax(dim=1, keepdim=True), True)
    keep = keep | (rescue & ~keep.any(dim=1, keepdim=True))
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)  # kept first, in region order
    mask = torch.arange(keep.shape[1], device=keep.device) < keep.sum(dim=1, keepdim=True)
    # Rows of the flattened [B·R, D] features: one row gather, not a take_along_dim whose index
    # would be broadcast to the features' full size.
    batch, regions, dim = images.shape
    rows = order + torch.arange(batch, device=order.device).unsqueeze(1) * regions
    out = images.reshape(batch * regions, dim).index_select(0, rows.reshape(-1)).view(batch, regions, dim)
    # A multiply zero-fills several times faster than masked_fill_ here (features are finite: validated).
    return out.mul_(mask.unsqueeze(-1).to(out.dtype)), mask


def dropout_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def device_batch(batch: dict[str, torch.Tensor], device: torch.device, region_dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A training batch from :func:`build_train_loader` on ``device``, ready for the model: moved
    (non_blocking: asynchronous from pinned memory), floating tensors upcast to float32 there, and,
    if ``region_dropout > 0``, regions dropped there (:func:`drop_regions`).

    ``generator`` (on ``device``) draws the dropout; by default one seeded from the batch's
    ``dropout_seed``, so the dropout is a pure function of ``(seed, epoch, batch)`` on a given device.
    """
    batch = dict(batch)
    seed = batch.pop("dropout_seed", None)  # read on the host: no sync
    moved = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    if region_dropout > 0:
        if generator is None:
            if seed is None:
                raise ValueError("region dropout needs a generator or a batch with its dropout_seed "
                                 "(from build_train_loader)")
            generator = dropout_generator(int(seed), device)
        # In the stored dtype, before the upcast: half the bytes to gather when the file is float16.
        moved["images"], moved["region_mask"] = drop_regions(moved["images"], moved["region_mask"],
                                                             region_dropout, generator)
    return {key: value.float() if value.is_floating_point() else value for key, value in moved.items()}


class EpochBatchSampler(Sampler[list[int]]):
    """Base for the training batch samplers: builds all of an epoch's batches from ``(seed, epoch)``
    identically on every replica, then gives replica ``rank`` every ``num_replicas``-th batch.

    Each replica gets ``len(self) = n_batches // num_replicas`` batches (DDP needs equal counts, so up to
    ``num_replicas − 1`` batches of an epoch are skipped when there are several replicas).
    """

    def __init__(self, n_images: int, captions_per_image: int, batch_size: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, drop_last: bool = False):
        if batch_size < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"batch sampler: need batch_size >= 1 and 0 <= rank < num_replicas, got "
                              f"batch_size={batch_size}, rank={rank}, num_replicas={num_replicas}")
        self.n_images, self.k, self.batch_size = n_images, captions_per_image, batch_size
        self.seed, self.num_replicas, self.rank, self.drop_last = seed, num_replicas, rank, drop_last
        self.epoch = 0
        if len(self) == 0:
            raise ConfigError(f"{n_images * captions_per_image} captions make fewer than one batch of "
                              f"{batch_size} per replica for {num_replicas} replica(s); lower "
                              "train.batch_size or the number of workers")

    @property
    def n_items(self) -> int:
        return self.n_images * self.k

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def n_batches(self) -> int:
        """Batches in a whole epoch, over all replicas."""
        size = self.effective_batch_size
        return self.n_items // size if self.drop_last else -(-self.n_items // size)

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size

    def __len__(self) -> int:
        return self.n_batches() // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches()
        yield from batches[self.rank::self.num_replicas][: len(self)]

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        """All caption indices of the epoch, in batch order (``[n_items]`` int64)."""
        raise NotImplementedError

    def epoch_batches(self) -> list[list[int]]:
        """Every batch of the current epoch (the same list on every replica)."""
        order = self.epoch_order(_rng(self.seed, self.epoch)).tolist()
        size = self.effective_batch_size
        batches = [order[start:start + size] for start in range(0, len(order), size)]
        if self.drop_last and len(batches[-1]) < size:
            batches.pop()
        return self._avoid_singleton(batches)

    def _avoid_singleton(self, batches: list[list[int]]) -> list[list[int]]:
        """A final batch of one caption has no negatives (and breaks BatchNorm): borrow one caption of
        another image from the batch before it."""
        if len(batches) < 2 or len(batches[-1]) != 1 or len(batches[-2]) < 3:
            return batches
        lone_image = batches[-1][0] // self.k
        donor = next((pos for pos, j in enumerate(batches[-2]) if j // self.k != lone_image), 0)
        batches[-1].insert(0, batches[-2].pop(donor))
        return batches


class RandomBatchSampler(EpochBatchSampler):
    """Plain shuffled batches (``data.unique_images: false``): two captions of one image may meet."""

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(self.n_items)


class UniqueImageBatchSampler(EpochBatchSampler):
    """Shuffled batches in which no two captions share an image, covering every caption once per epoch.

    Construction is O(k·N): each image's k captions are shuffled, then k rounds each visit every image
    once in a fresh random order; batches are consecutive chunks. A chunk inside one round is unique by
    construction; for the one chunk that straddles two rounds, images of the open batch are swapped out
    of the next round's head. Needs ``batch_size <= n_images``: larger batches are cut to ``n_images``.
    """

    @property
    def effective_batch_size(self) -> int:
        return min(self.batch_size, self.n_images)

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        n, k, size = self.n_images, self.k, self.effective_batch_size
        caption_slot = rng.permuted(np.tile(np.arange(k), (n, 1)), axis=1)  # [N, k]: round r uses slot [i, r]
        rounds, done = [], 0
        for r in range(k):
            images = rng.permutation(n)
            open_count = done % size
            if open_count:
                images = _clear_head(images, rounds[-1][-open_count:] // k, size - open_count)
            rounds.append(k * images + caption_slot[images, r])
            done += n
        return np.concatenate(rounds)


def _clear_head(images: np.ndarray, forbidden: np.ndarray, head: int) -> np.ndarray:
    """Permutation ``images`` with no element of ``forbidden`` in its first ``head`` positions.

    Conflicting head entries are swapped with the earliest non-forbidden entries after the head; there
    are always enough when ``head + len(forbidden) <= len(images)`` (see UniqueImageBatchSampler).
    """
    images = images.copy()
    bad = np.isin(images, forbidden)
    conflicts = np.flatnonzero(bad[:head])
    free = head + np.flatnonzero(~bad[head:])[: len(conflicts)]
    images[conflicts], images[free] = images[free], images[conflicts].copy()
    return images


class SeededBatches(Sampler[tuple[int, list[int]]]):
    """A training batch sampler's batches, each with its region-dropout seed: ``(seed, captions)``.

    The seed is :func:`batch_seed` of the batch's number in the whole epoch (over all replicas). It is
    computed here, in the main process, so persistent workers never need to learn the epoch.
    """

    def __init__(self, batches: EpochBatchSampler):
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        b = self.batches
        for n, captions in enumerate(b):
            yield batch_seed(b.seed, b.epoch, b.rank + n * b.num_replicas), captions


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reseed a training loader's shuffling and region dropout for ``epoch`` (call before iterating)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def batch_loader(dataset: Dataset, sampler: Sampler, num_workers: int, pin_memory: bool,
                 persistent: bool) -> DataLoader:
    """A DataLoader whose sampler yields whole batches and whose dataset builds each one (no per-item
    collation). ``persistent``: keep the workers between passes (``num_workers > 0`` only)."""
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=persistent and num_workers > 0)


def build_train_loader(cfg: DataConfig, split: PrecompSplit, tokenizer, batch_size: int, seed: int,
                       rank: int = 0, world_size: int = 1, text: TextFeatures | None = None,
                       pin_memory: bool = False) -> DataLoader:
    """Training batches of ``batch_size`` captions per replica, with, if ``cfg.unique_images``, no two
    captions of one image in a batch; pass each through :func:`device_batch` (which applies
    ``cfg.region_dropout``). Call :func:`set_epoch` every epoch. ``text``: the split's cached
    frozen-encoder features (batches then carry them, not token ids). ``pin_memory``: on for CUDA, so
    the copy in ``device_batch`` is asynchronous."""
    sampler_cls = UniqueImageBatchSampler if cfg.unique_images else RandomBatchSampler
    sampler = sampler_cls(split.n_images, split.captions_per_image, batch_size, seed=seed,
                          num_replicas=world_size, rank=rank)
    dataset = TrainBatches(split, CaptionText(split, tokenizer, cfg.max_text_len, text))
    # Persistent workers: re-forking them every epoch costs start-up time, and nothing in them
    # depends on the epoch (the sampler, in this process, sends each batch's seed).
    return batch_loader(dataset, SeededBatches(sampler), cfg.num_workers, pin_memory, persistent=True)


class EvalLoaders(NamedTuple):
    images: DataLoader  # N images in split order: images, region_mask (all True), image_ids
    captions: DataLoader  # k·N captions in split order: input_ids, attention_mask, image_ids


def build_eval_loaders(cfg: DataConfig, split: PrecompSplit, tokenizer, batch_size: int,
                       text: TextFeatures | None = None, pin_memory: bool = False) -> EvalLoaders:
    """Image and caption loaders over ``split`` in order, without augmentation (``text``: as for
    :func:`build_train_loader`)."""

    def loader(dataset: Dataset) -> DataLoader:
        batches = BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last=False)
        # Not persistent: a run holds several evaluation loaders, and idle workers would stay alive.
        return batch_loader(dataset, batches, cfg.num_workers, pin_memory, persistent=False)

    captions = EvalCaptions(split, CaptionText(split, tokenizer, cfg.max_text_len, text))
    return EvalLoaders(images=loader(EvalImages(split)), captions=loader(captions))
