"""Datasets, batch samplers and collation producing the batch contract of docs/architecture.md.

Training batch (``build_train_loader``), one row per caption:

- ``images``         ``[B, R, D]`` float32 — the caption's image; regions dropped by augmentation are
  moved to the end and zero-filled
- ``region_mask``    ``[B, R]`` bool — True for a real region
- ``input_ids``      ``[B, L]`` int64 — the text encoder's own tokenizer; or, given a frozen encoder's
  cache (``text=`` a :class:`~trainables.data.text_cache.TextFeatures`), its hidden states
  ``[B, L, H]`` float32, zero-padded on the right
- ``attention_mask`` ``[B, L]`` int64
- ``image_ids``      ``[B]`` int64 — index of the caption's image in its split (equal ids are positives)

Evaluation (``build_eval_loaders``) encodes the two sides separately, both in split order: an image
loader (``images``, ``region_mask`` all True, ``image_ids``) and a caption loader (``input_ids``,
``attention_mask``, ``image_ids``), so N image embeddings and k·N caption embeddings line up with the
1K folds of ``trainables.evaluation.coco_5fold_metrics``.

All randomness (shuffling, region dropout) is a pure function of ``(seed, epoch, index)``, so results do
not depend on ``num_workers`` or on the global RNG; call :func:`set_epoch` before every epoch.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainables.config import DataConfig
from trainables.data.precomp import PrecompSplit
from trainables.data.text_cache import TextFeatures
from trainables.errors import ConfigError


def _rng(*keys: int) -> np.random.Generator:
    """A generator fully determined by ``keys`` (negative seeds allowed)."""
    return np.random.default_rng([key % 2**63 for key in keys])


def drop_regions(features: np.ndarray, p: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Region dropout (VSE∞): drop each region with probability ``p``, always keeping at least one.

    ``features [R, D]`` -> (``[R, D]`` float32 with the kept regions first and zeros after, ``[R]`` bool mask).
    """
    n_regions = features.shape[0]
    keep = rng.random(n_regions) >= p
    if not keep.any():
        keep[rng.integers(n_regions)] = True
    out = torch.zeros(features.shape, dtype=torch.float32)
    out[: int(keep.sum())] = torch.from_numpy(np.asarray(features[keep], dtype=np.float32))
    mask = torch.zeros(n_regions, dtype=torch.bool)
    mask[: int(keep.sum())] = True
    return out, mask


def image_tensor(split: PrecompSplit, i: int) -> torch.Tensor:
    """A float32 copy of image ``i`` (``[R, D]``), read from the memmap (float16 files are upcast)."""
    return torch.from_numpy(np.array(split.image(i), dtype=np.float32))


def text_item(split: PrecompSplit, text: TextFeatures | None, j: int) -> dict:
    """Caption ``j`` as the collate function takes it: its string, or its cached hidden states [L_j, H]."""
    if text is None:
        return {"caption": split.caption(j)}
    return {"text_hidden": torch.from_numpy(np.array(text.caption(j), dtype=np.float32))}


def check_text(split: PrecompSplit, text: TextFeatures | None) -> None:
    if text is not None and len(text) != split.n_captions:
        raise ValueError(f"{text} has {len(text)} captions but split {split.split!r} uses {split.n_captions}")


class CaptionDataset(Dataset):
    """Item ``j`` = caption ``j`` with its image ``j // k``: ``{images [R,D], region_mask [R], caption,
    image_id}`` (``text_hidden [L_j, H]`` in place of ``caption`` when ``text`` holds the split's cached
    features).

    ``region_dropout`` applies only while ``train`` is True; it is seeded by (seed, epoch, j).
    """

    def __init__(self, split: PrecompSplit, region_dropout: float = 0.0, train: bool = False, seed: int = 0,
                 text: TextFeatures | None = None):
        check_text(split, text)
        self.split, self.region_dropout, self.train, self.seed = split, region_dropout, train, seed
        self.text = text
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, j: int) -> dict:
        i = self.split.image_of_caption(j)
        if self.train and self.region_dropout > 0:
            images, mask = drop_regions(self.split.image(i), self.region_dropout, _rng(self.seed, self.epoch, j))
        else:
            images = image_tensor(self.split, i)
            mask = torch.ones(images.shape[0], dtype=torch.bool)
        return {"images": images, "region_mask": mask, **text_item(self.split, self.text, j), "image_id": i}


class ImageDataset(Dataset):
    """Item ``i`` = image ``i`` with all its regions: ``{images [R,D], region_mask [R] (all True), image_id}``."""

    def __init__(self, split: PrecompSplit):
        self.split = split

    def __len__(self) -> int:
        return self.split.n_images

    def __getitem__(self, i: int) -> dict:
        images = image_tensor(self.split, i)
        return {"images": images, "region_mask": torch.ones(images.shape[0], dtype=torch.bool), "image_id": i}


class TextDataset(Dataset):
    """Item ``j`` = caption ``j`` only: ``{caption, image_id}`` (evaluation encodes text separately), or
    ``{text_hidden, image_id}`` from the cached features ``text``."""

    def __init__(self, split: PrecompSplit, text: TextFeatures | None = None):
        check_text(split, text)
        self.split, self.text = split, text

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, j: int) -> dict:
        return {**text_item(self.split, self.text, j), "image_id": self.split.image_of_caption(j)}


class Collate:
    """Stack image fields and tokenise captions into the batch contract (see the module docstring).

    A class rather than a closure so DataLoader workers can pickle it.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"image_ids": torch.tensor([item["image_id"] for item in items], dtype=torch.int64)}
        if "images" in items[0]:
            batch["images"] = torch.stack([item["images"] for item in items])
            batch["region_mask"] = torch.stack([item["region_mask"] for item in items])
        if "caption" in items[0]:
            tokens = self.tokenizer([item["caption"] for item in items], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            batch["input_ids"] = tokens["input_ids"].long()
            batch["attention_mask"] = tokens["attention_mask"].long()
        if "text_hidden" in items[0]:
            batch["input_ids"], batch["attention_mask"] = pad_hidden([item["text_hidden"] for item in items])
        return batch


def pad_hidden(hidden: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached hidden states ``[L_j, H]`` -> right-padded ``[B, L, H]`` float32, ``[B, L]`` int64 mask."""
    lengths = torch.tensor([h.shape[0] for h in hidden])
    padded = torch.nn.utils.rnn.pad_sequence(hidden, batch_first=True)
    mask = (torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return padded, mask


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


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reseed a training loader's shuffling and region dropout for ``epoch`` (call before iterating)."""
    for part in (loader.batch_sampler, loader.dataset):
        if hasattr(part, "set_epoch"):
            part.set_epoch(epoch)


def build_train_loader(cfg: DataConfig, split: PrecompSplit, tokenizer, batch_size: int, seed: int,
                       rank: int = 0, world_size: int = 1, text: TextFeatures | None = None) -> DataLoader:
    """Training batches of ``batch_size`` captions per replica, with region dropout and, if
    ``cfg.unique_images``, no two captions of one image in a batch. Call :func:`set_epoch` every epoch.
    ``text``: the split's cached frozen-encoder features (batches then carry them, not token ids)."""
    dataset = CaptionDataset(split, cfg.region_dropout, train=True, seed=seed, text=text)
    sampler_cls = UniqueImageBatchSampler if cfg.unique_images else RandomBatchSampler
    sampler = sampler_cls(split.n_images, split.captions_per_image, batch_size, seed=seed,
                          num_replicas=world_size, rank=rank)
    # persistent_workers stays False: workers are re-forked each epoch and so see the new epoch.
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=Collate(tokenizer, cfg.max_text_len),
                      num_workers=cfg.num_workers)


class EvalLoaders(NamedTuple):
    images: DataLoader  # N images in split order: images, region_mask (all True), image_ids
    captions: DataLoader  # k·N captions in split order: input_ids, attention_mask, image_ids


def build_eval_loaders(cfg: DataConfig, split: PrecompSplit, tokenizer, batch_size: int,
                       text: TextFeatures | None = None) -> EvalLoaders:
    """Image and caption loaders over ``split`` in order, without augmentation (``text``: as for
    :func:`build_train_loader`)."""
    collate = Collate(tokenizer, cfg.max_text_len)

    def loader(dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                          num_workers=cfg.num_workers)

    return EvalLoaders(images=loader(ImageDataset(split)), captions=loader(TextDataset(split, text)))
