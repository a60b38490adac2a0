"""Precomp loading/validation, the ``data`` CLI command, datasets, collation and batch samplers."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from study.commands import data as data_command
from trainables.config import DataConfig
from trainables.data.loader import (
    RandomBatchSampler,
    UniqueImageBatchSampler,
    build_eval_loaders,
    build_train_loader,
    device_batch,
    drop_regions,
    set_epoch,
)
from trainables.data.precomp import (
    CaptionLines,
    PrecompSplit,
    check_dataset,
    check_eval_protocol,
    scan_finite,
    validate_split,
)
from trainables.data.synth import write_synth
from trainables.errors import ConfigError, DataError
from trainables.text_models import load_tokenizer


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synth(root, images=40, regions=8, feature_dim=16)
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def write_split(root: Path, split: str, ims, caps: list[str] | str, ids: list[str] | None = None) -> None:
    """A hand-made split; ``caps`` as a list is written one per line, as a str verbatim."""
    root.mkdir(parents=True, exist_ok=True)
    if ims is not None:
        np.save(root / f"{split}_ims.npy", ims)
    if caps is not None:
        (root / f"{split}_caps.txt").write_text(caps if isinstance(caps, str) else "\n".join(caps) + "\n")
    if ids is not None:
        (root / f"{split}_ids.txt").write_text("\n".join(ids) + "\n")


def tiny_split(root: Path, split: str = "test", n: int = 3, k: int = 5, **overrides) -> None:
    ims = np.random.default_rng(0).standard_normal((n, 4, 6)).astype(np.float32)
    caps = [f"caption {j}" for j in range(k * n)]
    write_split(root, split, overrides.get("ims", ims), overrides.get("caps", caps), overrides.get("ids"))


# ----------------------------------------------------------------------------------------- precomp


def test_split_shapes_dtypes_and_memmap(synth_root):
    split = PrecompSplit(synth_root, "train")
    assert (split.n_images, split.captions_per_image, split.n_regions, split.feature_dim) == (40, 5, 8, 16)
    assert isinstance(split.images, np.memmap) and split.images.dtype == np.float32
    assert split.n_captions == len(split.captions) == 200
    lines = (synth_root / "train_caps.txt").read_text().splitlines()
    assert split.caption(7) == lines[7] and split.image_of_caption(7) == 1
    assert np.array_equal(split.image(3), np.load(synth_root / "train_ims.npy")[3])
    with pytest.raises(IndexError):
        split.image(40)


def test_pickle_reopens_memmap_instead_of_copying(synth_root):
    split = PrecompSplit(synth_root, "train", max_images=10)
    blob = pickle.dumps(split)
    assert len(blob) < split.images.nbytes  # the features are not in the pickle
    back = pickle.loads(blob)
    assert isinstance(back.images, np.memmap) and back.images.shape == (10, 8, 16)
    assert np.array_equal(back.image(9), split.image(9))


def test_dev_is_cut_to_1000_and_max_images_cuts_any_split(tmp_path):
    ims = np.zeros((1100, 1, 2), np.float32)
    caps = [f"c{j}" for j in range(2200)]
    write_split(tmp_path, "dev", ims, caps)
    write_split(tmp_path, "test", ims, caps)
    dev = PrecompSplit(tmp_path, "dev")
    assert (dev.n_images, dev.captions_per_image, dev.n_captions, dev.images.shape[0]) == (1000, 2, 2000, 1000)
    assert PrecompSplit(tmp_path, "test").n_images == 1100
    cut = PrecompSplit(tmp_path, "test", max_images=7)
    assert cut.n_images == 7 and list(cut.captions) == caps[:14] and isinstance(cut.images, np.memmap)
    assert PrecompSplit(tmp_path, "dev", max_images=5000).n_images == 1000
    assert validate_split(tmp_path, "dev")["used_images"] == 1000


@pytest.mark.parametrize("text", [
    "a dog\nthe cat\n",
    "no final newline\nlast",
    "a\n\n  \nb\n\n",  # blank lines are kept (and caught later by check_nonempty)
    "crlf line\r\n  spaced  \r\n",
    "caf\u00e9 \u00fcber \u65e5\u672c\u8a9e\n\u00e9\u00e9\u00e9\u00e9\n",  # multi-byte characters
    "\n",
    "",
])
@pytest.mark.parametrize("chunk_bytes", [1, 3, 64])
def test_caption_lines_match_read_lines(tmp_path, text, chunk_bytes):
    from trainables.data.precomp import read_lines

    path = tmp_path / "caps.txt"
    path.write_bytes(text.encode("utf-8"))
    lines = CaptionLines(path, chunk_bytes=chunk_bytes)  # tiny chunks split multi-byte characters
    assert list(lines) == read_lines(path)
    assert len(lines) == len(read_lines(path))
    if len(lines) >= 2:
        assert list(lines[1:]) == read_lines(path)[1:] and lines[-1] == read_lines(path)[-1]
        clone = pickle.loads(pickle.dumps(lines[1:]))
        assert list(clone) == read_lines(path)[1:]
        assert len(pickle.dumps(lines)) < 1000 + 16 * len(lines)  # offsets, not the text or the map


def test_caption_lines_reject_bad_utf8_with_the_byte_offset(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_bytes(b"fine\nbad \xff here\n")
    with pytest.raises(DataError, match=r"caps\.txt is not valid UTF-8 \(byte 9\)"):
        CaptionLines(path, chunk_bytes=4)


def test_coco_5fold_needs_a_test_split_of_whole_1k_folds(tmp_path):
    tiny_split(tmp_path, "testall", n=2000, ims=np.zeros((2000, 1, 1), np.float32))
    coco = DataConfig(root=str(tmp_path), test_split="testall", eval_protocol="coco_5fold")
    check_eval_protocol(coco)  # two whole folds
    check_eval_protocol(coco.model_copy(update={"max_images": 1000}))
    with pytest.raises(ConfigError, match=r"coco_5fold needs whole folds of 1000 images, but test split "
                                          r"'testall' has 1500; use eval_protocol: full"):
        check_eval_protocol(coco.model_copy(update={"max_images": 1500}))
    check_eval_protocol(DataConfig(root=str(tmp_path), test_split="testall", max_images=1500))  # full
    check_eval_protocol(coco.model_copy(update={"test_split": ""}))  # no test split: nothing to score


def test_check_dataset_summarises_the_existing_splits(synth_root):
    summaries = check_dataset(synth_root)
    assert [s["split"] for s in summaries] == ["train", "dev", "test"]
    assert summaries[1] == {"split": "dev", "images": 100, "used_images": 100, "captions": 500,
                            "captions_per_image": 5, "regions": 8, "feature_dim": 16, "dtype": "float32",
                            "ids": 100}


def _nan_ims():
    ims = np.zeros((3, 4, 6), np.float32)
    ims[2, 1, 3] = np.nan
    return ims


def _inf_ims():
    ims = np.zeros((3, 4, 6), np.float32)
    ims[1, 0, 0] = -np.inf
    return ims


# (name, files to write, expected file in the message, expected words in the message)
DEFECTS = [
    ("missing captions", dict(caps=None), "test_caps.txt", "not found"),
    ("missing features", dict(ims=None), "test_ims.npy", "not found"),
    ("caption count", dict(caps=[f"c{j}" for j in range(14)]), "test_caps.txt", "14 lines for 3 images"),
    ("fewer captions than images", dict(caps=["a", "b"]), "test_caps.txt", "2 lines for 3 images"),
    ("empty caption file", dict(caps=""), "test_caps.txt", "empty"),
    ("rank 2", dict(ims=np.zeros((3, 6), np.float32)), "test_ims.npy", "rank 3"),
    ("rank 4", dict(ims=np.zeros((3, 1, 2, 6), np.float32)), "test_ims.npy", "rank 3"),
    ("float64", dict(ims=np.zeros((3, 4, 6))), "test_ims.npy", "float32"),
    ("int", dict(ims=np.zeros((3, 4, 6), np.int32)), "test_ims.npy", "float32"),
    ("no images", dict(ims=np.zeros((0, 4, 6), np.float32)), "test_ims.npy", "empty axis"),
    ("nan", dict(ims=_nan_ims()), "test_ims.npy", "image 2 has NaN"),
    ("inf", dict(ims=_inf_ims()), "test_ims.npy", "image 1 has infinite"),
    ("empty caption", dict(caps=[f"c{j}" for j in range(6)] + ["  "] + [f"c{j}" for j in range(8)]),
     "test_caps.txt", "line 7 is an empty caption"),
    ("ids count", dict(ids=["a", "b"]), "test_ids.txt", "2 lines"),
]


@pytest.mark.parametrize("name,files,filename,words", DEFECTS, ids=[d[0] for d in DEFECTS])
def test_every_defect_is_one_line_naming_the_file(tmp_path, name, files, filename, words):
    tiny_split(tmp_path, **files)
    with pytest.raises(DataError) as err:
        check_dataset(tmp_path)
    message = str(err.value)
    assert filename in message and words in message and "\n" not in message


def test_ids_may_have_one_line_per_image_or_per_caption(tmp_path):
    tiny_split(tmp_path, ids=["a", "b", "c"])
    assert PrecompSplit(tmp_path, "test").ids == ["a", "b", "c"]
    tiny_split(tmp_path, ids=[str(j) for j in range(15)])
    assert PrecompSplit(tmp_path, "test", max_images=2).ids == [str(j) for j in range(10)]


def test_not_a_npy_file(tmp_path):
    tiny_split(tmp_path)
    (tmp_path / "test_ims.npy").write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match=r"test_ims\.npy is not a readable \.npy"):
        PrecompSplit(tmp_path, "test")


def test_missing_file_lists_the_splits_present(tmp_path):
    tiny_split(tmp_path, "train")
    with pytest.raises(DataError, match=r"dev_ims\.npy not found \(splits present in .*: train\)"):
        PrecompSplit(tmp_path, "dev")


def test_missing_root_and_empty_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no precomp split found"):
        check_dataset(tmp_path)


def test_nan_scan_works_across_chunks():
    ims = np.zeros((50, 2, 3), np.float32)
    ims[37, 1, 2] = np.nan
    scan_finite(ims[:37], Path("x_ims.npy"), chunk_bytes=24)  # one image per chunk, all clean
    with pytest.raises(DataError, match="image 37 has NaN"):
        scan_finite(ims, Path("x_ims.npy"), chunk_bytes=5 * 24)


# ------------------------------------------------------------------------------------------ CLI


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    data_command.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_data_check_ok(synth_root, capsys):
    assert run_cli(["data", "check", str(synth_root)]) == 0
    out = capsys.readouterr().out
    assert "train: 40 images x 8 regions x 16-d float32, 200 captions (5 per image)" in out


def test_data_check_bad_data_is_one_line_and_exit_2(tmp_path, capsys):
    tiny_split(tmp_path, caps=[f"c{j}" for j in range(14)])
    assert run_cli(["data", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "test_caps.txt" in err


def test_data_synth_command_writes_a_valid_dataset(tmp_path, capsys):
    out = tmp_path / "s"
    assert run_cli(["data", "synth", "--out", str(out), "--images", "8", "--regions", "8", "--feature-dim", "4"]) == 0
    assert [s["images"] for s in check_dataset(out)] == [8, 100, 4]


def test_through_the_real_cli_main(synth_root, tmp_path, capsys):
    pytest.importorskip("study.commands.train")  # study.cli imports every command
    from study.cli import main

    assert main(["data", "check", str(synth_root)]) == 0
    assert main(["data", "synth", "--out", str(tmp_path), "--regions", "3"]) == 2
    assert "regions=3 is too few" in capsys.readouterr().err


# -------------------------------------------------------------------------------- datasets/loaders


def reference_batch(split: PrecompSplit, tokenizer, captions: list[int], max_length: int = 40) -> dict:
    """The old per-item path, kept as the naive reference: each caption's image copied to float32 on
    its own, then stacked; the captions tokenised together."""
    k = split.captions_per_image
    images = torch.stack([torch.from_numpy(np.array(split.image(j // k), dtype=np.float32))
                          for j in captions])
    tokens = tokenizer([split.caption(j) for j in captions], padding=True, truncation=True,
                       max_length=max_length, return_tensors="pt")
    return {"images": images, "region_mask": torch.ones(images.shape[:2], dtype=torch.bool),
            "input_ids": tokens["input_ids"].long(), "attention_mask": tokens["attention_mask"].long(),
            "image_ids": torch.tensor([j // k for j in captions])}


def reference_drop_regions(features: np.ndarray, p: float, rng: np.random.Generator) -> torch.Tensor:
    """The old per-item region dropout on the host; returns its ``[R]`` mask (a prefix)."""
    keep = rng.random(features.shape[0]) >= p
    if not keep.any():
        keep[rng.integers(features.shape[0])] = True
    return torch.arange(features.shape[0]) < int(keep.sum())


CPU = torch.device("cpu")


def test_train_batches_follow_the_contract(synth_root, tokenizer):
    split = PrecompSplit(synth_root, "train")
    loader = build_train_loader(DataConfig(region_dropout=0.3), split, tokenizer, batch_size=16, seed=0)
    host = next(iter(loader))
    assert set(host) == {"images", "region_mask", "input_ids", "attention_mask", "image_ids", "dropout_seed"}
    assert host["region_mask"].all() and host["dropout_seed"].shape == ()  # dropout waits for the device
    batch = device_batch(host, CPU, 0.3)
    assert batch["images"].shape == (16, 8, 16) and batch["images"].dtype == torch.float32
    assert batch["region_mask"].shape == (16, 8) and batch["region_mask"].dtype == torch.bool
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["image_ids"].dtype == torch.int64
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["image_ids"].shape == (16,)
    assert set(batch) == {"images", "region_mask", "input_ids", "attention_mask", "image_ids"}
    assert len(set(batch["image_ids"].tolist())) == 16  # unique_images is the default
    assert not batch["region_mask"].all()  # some regions dropped
    assert (batch["images"][~batch["region_mask"]] == 0).all()


@pytest.mark.parametrize("unique", [True, False])
def test_batches_equal_the_per_item_reference(synth_root, tokenizer, unique):
    split = PrecompSplit(synth_root, "train", max_images=24)
    cfg = DataConfig(unique_images=unique, region_dropout=0.0)
    loader = build_train_loader(cfg, split, tokenizer, batch_size=10, seed=7)
    sampler = (UniqueImageBatchSampler if unique else RandomBatchSampler)(24, 5, 10, seed=7)
    for epoch in (0, 3):
        set_epoch(loader, epoch)
        got = [device_batch(batch, CPU, cfg.region_dropout) for batch in loader]
        want = [reference_batch(split, tokenizer, captions) for captions in epoch_batches(sampler, epoch)]
        assert len(got) == len(want) == 12
        for a, b in zip(got, want, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


class CountingArray:
    """Array stand-in that counts how often it is indexed."""

    def __init__(self, array):
        self.array, self.calls = array, 0
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, index):
        self.calls += 1
        return self.array[index]


def test_a_batch_is_gathered_with_one_fancy_index(synth_root, tokenizer):
    split = PrecompSplit(synth_root, "train")
    split.images = CountingArray(split.images)
    batches = list(build_train_loader(DataConfig(), split, tokenizer, batch_size=16, seed=0))
    assert split.images.calls == len(batches) == 13  # 200 captions in 13 batches: one index each
    split = PrecompSplit(synth_root, "dev", max_images=40)
    split.images = CountingArray(split.images)
    assert len(list(build_eval_loaders(DataConfig(), split, tokenizer, 16).images)) == split.images.calls == 3


def test_float16_features_keep_their_dtype_until_the_device(tmp_path, tokenizer):
    ims = np.random.default_rng(0).standard_normal((6, 4, 6)).astype(np.float16)
    tiny_split(tmp_path, "train", n=6, ims=ims)
    split = PrecompSplit(tmp_path, "train")
    host = next(iter(build_train_loader(DataConfig(region_dropout=0.5), split, tokenizer, 4, seed=0)))
    assert host["images"].dtype == torch.float16  # half the bytes through the loader and the copy
    plain = device_batch(host, CPU, 0.0)
    assert plain["images"].dtype == torch.float32
    assert torch.equal(plain["images"], torch.from_numpy(ims.astype(np.float32))[host["image_ids"]])
    assert device_batch(host, CPU, 0.5)["images"].dtype == torch.float32
    evaluated = next(iter(build_eval_loaders(DataConfig(), split, tokenizer, 6).images))["images"]
    assert evaluated.dtype == torch.float32
    assert torch.equal(evaluated, torch.from_numpy(ims.astype(np.float32)))
    assert validate_split(tmp_path, "train")["dtype"] == "float16"


def dropped(images: torch.Tensor, p: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return drop_regions(images, torch.ones(images.shape[:2], dtype=torch.bool), p, generator)


def test_region_dropout_moves_kept_regions_first_in_order_and_keeps_one():
    images = torch.arange(1, 1 + 300 * 6 * 2, dtype=torch.float32).view(300, 6, 2)  # rows all distinct
    out, mask = dropped(images, 0.6)
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= 6 and 0 < (counts < 6).float().mean()
    assert torch.equal(mask, torch.arange(6) < counts.unsqueeze(1))  # a prefix
    assert (out[~mask] == 0).all()
    for row in range(300):
        kept = out[row, : counts[row], 0].long()
        positions = ((kept - 1) // 2) % 6  # where each kept region was
        assert torch.equal(out[row, : counts[row]], images[row, positions])  # the region itself
        assert (positions.diff() > 0).all()  # in its original order
    out, mask = dropped(images, 0.0)
    assert mask.all() and torch.equal(out, images)


@pytest.mark.parametrize("p", [0.2, 0.7, 0.97])
def test_region_dropout_has_the_distribution_of_the_per_item_reference(p):
    """Kept-region counts follow Binomial(R, 1 - p) with an empty draw turned into one region, on the
    device path and in the old per-item path alike; the rescued region is uniform."""
    from scipy import stats

    rows, regions = 6000, 6
    _, mask = dropped(torch.zeros(rows, regions, 1), p)
    features = np.zeros((regions, 1), np.float32)
    reference = torch.stack([reference_drop_regions(features, p, np.random.default_rng([1, j]))
                             for j in range(rows)])
    expected = stats.binom.pmf(np.arange(regions + 1), regions, 1 - p)
    expected[1] += expected[0]
    expected = expected[1:]
    for counts in (mask.sum(1), reference.sum(1)):
        observed = np.bincount(counts.numpy(), minlength=regions + 1)[1:]
        keep = expected * rows >= 5  # chi-square needs expected counts of at least ~5
        observed_kept = observed[keep]
        expected_kept = expected[keep] / expected[keep].sum() * observed_kept.sum()
        assert stats.chisquare(observed_kept, expected_kept).pvalue > 1e-3, (observed, expected * rows)
    images = torch.arange(regions, dtype=torch.float32).view(1, regions, 1).repeat(rows, 1, 1)
    out, mask = dropped(images, 0.999)
    alone = out[mask.sum(1) == 1, 0, 0].long()  # which region a row that lost all kept
    assert stats.chisquare(np.bincount(alone.numpy(), minlength=regions)).pvalue > 1e-3


def test_region_dropout_is_deterministic_per_seed_and_epoch(synth_root, tokenizer):
    split = PrecompSplit(synth_root, "train")
    loader = build_train_loader(DataConfig(region_dropout=0.5), split, tokenizer, batch_size=16, seed=1)

    def masks(epoch: int) -> list[torch.Tensor]:
        set_epoch(loader, epoch)
        return [device_batch(batch, CPU, 0.5)["region_mask"] for batch in loader]

    first = masks(0)
    assert all(torch.equal(a, b) for a, b in zip(first, masks(0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, masks(1), strict=True))
    assert len({tuple(m.flatten().tolist()) for m in first}) == len(first)  # each batch its own draw
    batch = next(iter(loader))
    with_generator = [device_batch(batch, CPU, 0.5, torch.Generator().manual_seed(9))["region_mask"]
                      for _ in range(2)]
    assert torch.equal(*with_generator)
    without_seed = {key: value for key, value in batch.items() if key != "dropout_seed"}
    with pytest.raises(ValueError, match="needs a generator"):
        device_batch(without_seed, CPU, 0.5)
    assert device_batch(without_seed, CPU, 0.0)["region_mask"].all()  # no dropout: no seed needed


def test_workers_give_the_same_batches_as_the_main_process(synth_root, tokenizer):
    split = PrecompSplit(synth_root, "train", max_images=12)

    def epochs(workers: int) -> list[dict]:
        loader = build_train_loader(DataConfig(num_workers=workers, region_dropout=0.4), split, tokenizer,
                                    batch_size=8, seed=3)
        out = []
        for epoch, steps in ((2, 2), (3, None)):  # persistent workers follow the epoch, also after a break
            set_epoch(loader, epoch)
            out += [device_batch(batch, CPU, 0.4) for _, batch in zip(range(steps or len(loader)), loader)]
        return out

    for a, b in zip(epochs(0), epochs(2), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_pin_memory_and_persistent_workers_are_plumbed(synth_root, tokenizer):
    split = PrecompSplit(synth_root, "train", max_images=12)
    plain = build_train_loader(DataConfig(), split, tokenizer, 8, seed=0)
    assert not plain.pin_memory and not plain.persistent_workers
    pinned = build_train_loader(DataConfig(num_workers=1), split, tokenizer, 8, seed=0, pin_memory=True)
    assert pinned.pin_memory and pinned.persistent_workers
    evaluation = build_eval_loaders(DataConfig(num_workers=1), split, tokenizer, 8, pin_memory=True)
    assert evaluation.images.pin_memory and not evaluation.images.persistent_workers


def test_cached_hidden_states_are_gathered_like_padded_items(tmp_path):
    from trainables.data.loader import gather_hidden
    from trainables.data.text_cache import TextFeatures

    lengths = np.array([3, 1, 4, 2, 5])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    hidden = np.random.default_rng(0).standard_normal((offsets[-1], 3)).astype(np.float32)
    np.save(tmp_path / "hidden.npy", hidden)
    np.save(tmp_path / "offsets.npy", offsets)
    text = TextFeatures(tmp_path)
    captions = np.array([4, 1, 2])
    hidden, mask = gather_hidden(text, captions)
    items = [torch.from_numpy(np.array(text.caption(j))) for j in captions]
    assert torch.equal(hidden, torch.nn.utils.rnn.pad_sequence(items, batch_first=True))
    assert torch.equal(mask, (torch.arange(5) < torch.tensor([5, 1, 4]).unsqueeze(1)).long())


def test_eval_loaders_cover_the_split_in_order(synth_root, tokenizer):
    split = PrecompSplit(synth_root, "dev", max_images=30)
    loaders = build_eval_loaders(DataConfig(), split, tokenizer, batch_size=16)
    image_batches, caption_batches = list(loaders.images), list(loaders.captions)
    image_ids = torch.cat([b["image_ids"] for b in image_batches])
    assert torch.equal(image_ids, torch.arange(30))
    assert all(b["region_mask"].all() for b in image_batches)
    assert torch.equal(torch.cat([b["images"] for b in image_batches]), torch.from_numpy(np.array(split.images)))
    caption_ids = torch.cat([b["image_ids"] for b in caption_batches])
    assert torch.equal(caption_ids, torch.arange(150) // 5)
    assert set(caption_batches[0]) == {"input_ids", "attention_mask", "image_ids"}
    want = reference_batch(split, tokenizer, list(range(16)))
    assert all(torch.equal(caption_batches[0][key], want[key]) for key in caption_batches[0])


# ----------------------------------------------------------------------------------- batch samplers


def epoch_batches(sampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("n_images,k,batch_size", [(50, 5, 8), (50, 5, 50), (7, 5, 16), (33, 1, 4), (10, 3, 9)])
def test_unique_image_batches_cover_every_caption_once(n_images, k, batch_size):
    sampler = UniqueImageBatchSampler(n_images, k, batch_size, seed=0)
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        assert len(batches) == len(sampler)
        assert sorted(j for batch in batches for j in batch) == list(range(n_images * k))
        for batch in batches:
            assert len({j // k for j in batch}) == len(batch)
            assert len(batch) <= min(batch_size, n_images) and len(batch) >= min(2, n_images * k)


def test_large_unique_sampler_is_fast_and_correct():
    sampler = UniqueImageBatchSampler(100_000, 5, 128, seed=0)
    order = np.concatenate([np.asarray(b) for b in sampler])
    assert np.array_equal(np.sort(order), np.arange(500_000))
    batches = np.asarray(order[: len(order) // 128 * 128]).reshape(-1, 128) // 5
    assert (np.diff(np.sort(batches, axis=1), axis=1) > 0).all()


def test_samplers_are_deterministic_per_epoch_and_differ_across_epochs():
    for cls in (UniqueImageBatchSampler, RandomBatchSampler):
        a, b = cls(40, 5, 8, seed=4), cls(40, 5, 8, seed=4)
        assert epoch_batches(a, 0) == epoch_batches(b, 0)
        assert epoch_batches(a, 0) != epoch_batches(a, 1)
        assert epoch_batches(a, 0) != epoch_batches(cls(40, 5, 8, seed=5), 0)


def test_random_sampler_covers_every_caption_once():
    batches = list(RandomBatchSampler(101, 1, 10, seed=0))
    assert sorted(j for batch in batches for j in batch) == list(range(101))
    assert [len(b) for b in batches] == [10] * 9 + [9, 2]  # no lone final caption


@pytest.mark.parametrize("cls", [UniqueImageBatchSampler, RandomBatchSampler])
def test_replica_shards_are_disjoint_with_equal_counts(cls):
    shards = [epoch_batches(cls(45, 5, 8, seed=0, num_replicas=3, rank=r), 1) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 29 // 3
    seen = [j for shard in shards for batch in shard for j in batch]
    assert len(seen) == len(set(seen))
    whole = epoch_batches(cls(45, 5, 8, seed=0), 1)
    assert sorted(map(tuple, (b for s in shards for b in s))) == sorted(map(tuple, whole[:27]))


def test_too_few_captions_for_the_replicas_is_a_config_error():
    with pytest.raises(ConfigError, match="fewer than one batch"):
        UniqueImageBatchSampler(2, 1, 4, num_replicas=4, rank=0)
