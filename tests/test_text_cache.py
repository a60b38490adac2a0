"""The frozen-encoder feature cache (trainables/data/text_cache.py): same metrics as re-encoding,
encoded once, keyed by what it depends on, safe under concurrent writers."""

from __future__ import annotations

import multiprocessing
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import trainables.encoders
from trainables.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from trainables.data import PrecompSplit, build_eval_loaders, build_train_loader, set_epoch
from trainables.data.text_cache import TextFeatures, cache_key, cached_text_features, frozen_text
from trainables.encoders import TextEncoder
from trainables.errors import DataError
from trainables.loop import fit
from trainables.reporters import LocalReporter
from trainables.text_models import load_text_model, load_tokenizer

RETRIEVAL = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["rsum"]


@pytest.fixture
def data_root(synth_root, tmp_path) -> Path:
    """A private copy of the shared benchmark, so each test starts without cache entries."""
    root = tmp_path / "data"
    shutil.copytree(synth_root, root, ignore=shutil.ignore_patterns(".cache"))
    return root


@pytest.fixture
def encoder_calls(monkeypatch) -> list[int]:
    """Counts forward calls of every text backbone built from here on (one entry per call: batch size)."""
    calls: list[int] = []

    def counting(name: str):
        model = load_text_model(name)
        def count(module, args, kwargs, out):
            calls.append(kwargs["input_ids"].shape[0])

        model.register_forward_hook(count, with_kwargs=True)
        return model

    monkeypatch.setattr(trainables.encoders, "load_text_model", counting)
    return calls


def tiny_job(root: Path, cache: bool) -> JobConfig:
    return JobConfig(method="base", data=DataConfig(root=str(root), max_images=100),
                     model=ModelConfig(embed_dim=32, text_encoder="tiny", freeze_text=True, cache_text=cache),
                     train=TrainConfig(epochs=2, batch_size=32, loss="infonce", text_lr_scale=1.0))


def frozen_backbone(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TextEncoder("tiny", 16, freeze=True).backbone


def test_cached_training_gives_the_metrics_of_re_encoding(data_root, tmp_path, encoder_calls):
    uncached = fit(tiny_job(data_root, cache=False), LocalReporter(tmp_path / "uncached"))
    calls_uncached = len(encoder_calls)
    cached = fit(tiny_job(data_root, cache=True), LocalReporter(tmp_path / "cached"))
    calls_first_cached = len(encoder_calls) - calls_uncached
    again = fit(tiny_job(data_root, cache=True), LocalReporter(tmp_path / "again"))
    assert calls_uncached > 0 and len(encoder_calls) - calls_uncached == calls_first_cached
    # The first cached run encodes each split once (train, dev and test: 500 captions each), the
    # second none at all; the uncached run re-encodes in every training step and every evaluation.
    assert sum(encoder_calls[calls_uncached:]) == 3 * 500
    assert sum(encoder_calls[:calls_uncached]) >= 2 * 500 + 2 * 500 + 500
    for a, b, c in zip(uncached, cached, again):
        for key in RETRIEVAL + [f"test_{k}" for k in RETRIEVAL if f"test_{k}" in a]:
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
        assert b == {**c, "epoch_time_s": b["epoch_time_s"]}  # a reused cache is the same cache
        # Hidden states of a caption differ in the last bits with its batch's padding length only.
        for key in ("loss", "gap_centroid_dist", "alignment"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    # It trained: the comparison is not of two no-ops (the loss, not rSum: 100 images sit near
    # chance after 2 epochs, and their rSum moves either way with the region-dropout draws).
    assert uncached[-1]["loss"] < uncached[0]["loss"]


def test_frozen_backbone_is_deterministic_in_train_mode():
    """The uncached path used to run the frozen encoder with dropout on (train mode)."""
    torch.manual_seed(0)
    encoder = TextEncoder("tiny", 16, freeze=True).train()
    assert encoder.training and not encoder.backbone.training and encoder.proj.training
    ids = torch.randint(1000, 5000, (4, 9))
    mask = torch.ones_like(ids)
    assert torch.equal(encoder(ids, mask), encoder(ids, mask))
    out = encoder(ids, mask)
    assert out.requires_grad  # the projection still learns
    trainable = TextEncoder("tiny", 16, freeze=False).train()
    assert trainable.backbone.training
    with pytest.raises(ValueError, match="frozen text encoder"):
        trainable(torch.zeros(2, 3, trainable.backbone.config.hidden_size), torch.ones(2, 3))


def test_cached_features_are_the_encoder_outputs_and_batches_keep_the_contract(data_root):
    split = PrecompSplit(data_root, "dev", 20)
    tokenizer = load_tokenizer("tiny")
    backbone = frozen_backbone()
    text = cached_text_features(split, backbone, tokenizer, 40, torch.device("cpu"))
    assert len(text) == split.n_captions == 100 and text.hidden_size == 64
    assert isinstance(text.hidden, np.memmap) and not text.hidden.flags.writeable
    with torch.no_grad():
        for j in (0, 37, 99):
            tokens = tokenizer([split.caption(j)], truncation=True, max_length=40, return_tensors="pt")
            alone = backbone(**tokens).last_hidden_state[0].numpy()
            np.testing.assert_allclose(text.caption(j), alone, atol=1e-5)
    cfg = DataConfig(root=str(data_root), max_images=20)
    plain = build_train_loader(cfg, split, tokenizer, 8, seed=3)
    cached = build_train_loader(cfg, split, tokenizer, 8, seed=3, text=text)
    set_epoch(plain, 1)
    set_epoch(cached, 1)
    padded = 0
    for a, b in zip(plain, cached):
        assert b["input_ids"].dtype == torch.float32 and b["input_ids"].shape == (*a["input_ids"].shape, 64)
        assert torch.equal(a["attention_mask"], b["attention_mask"]) and torch.equal(a["images"], b["images"])
        padding = b["input_ids"][b["attention_mask"] == 0]
        assert not padding.any()  # zero-padded on the right
        padded += padding.numel()
    assert padded > 0
    with_workers = cfg.model_copy(update={"num_workers": 2})
    workers = build_train_loader(with_workers, split, tokenizer, 8, seed=3, text=text)
    set_epoch(workers, 1)
    for a, b in zip(cached, workers):  # forked workers read the same memory-mapped entry
        assert all(torch.equal(a[key], b[key]) for key in ("input_ids", "attention_mask", "image_ids"))
    captions = build_eval_loaders(cfg, split, tokenizer, 32, text=text).captions
    assert torch.equal(torch.cat([batch["image_ids"] for batch in captions]), torch.arange(100) // 5)
    assert pickle.loads(pickle.dumps(text)).caption(5).tolist() == text.caption(5).tolist()
    assert len(pickle.dumps(text)) < 1000  # the path travels, not the array


def test_the_key_follows_captions_length_and_weights_not_the_folder(data_root, tmp_path):
    tokenizer = load_tokenizer("tiny")
    backbone = frozen_backbone()
    split = PrecompSplit(data_root, "dev", 20)
    key, parts = cache_key(split, backbone, tokenizer, 40)
    assert parts["n_captions"] == 100 and parts["max_length"] == 40
    assert cache_key(split, frozen_backbone(0), tokenizer, 40)[0] == key  # same weights, another object
    assert cache_key(split, frozen_backbone(1), tokenizer, 40)[0] != key  # tiny's seed = other weights
    assert cache_key(split, backbone, tokenizer, 32)[0] != key
    assert cache_key(PrecompSplit(data_root, "dev", 10), backbone, tokenizer, 40)[0] != key
    moved = tmp_path / "moved"
    shutil.copytree(data_root, moved)
    assert cache_key(PrecompSplit(moved, "dev", 20), backbone, tokenizer, 40)[0] == key
    caps = moved / "dev_caps.txt"
    lines = caps.read_text().splitlines()
    caps.write_text("\n".join([lines[0] + " again", *lines[1:]]) + "\n")  # one caption changes
    assert cache_key(PrecompSplit(moved, "dev", 20), backbone, tokenizer, 40)[0] != key
    with torch.no_grad():
        backbone.embeddings.word_embeddings.weight[5, 0] += 1.0  # an in-place edit of the weights
    assert cache_key(split, backbone, tokenizer, 40)[0] != key


def test_a_second_request_reuses_the_entry_and_an_unwritable_root_falls_back(data_root, tmp_path, monkeypatch,
                                                                            encoder_calls):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    split = PrecompSplit(data_root, "dev", 20)
    backbone = TextEncoder("tiny", 16, freeze=True).backbone
    first = cached_text_features(split, backbone, load_tokenizer("tiny"), 40, torch.device("cpu"))
    assert first.path.parent == data_root / ".cache" / "text" and sum(encoder_calls) == 100
    stamp = (first.path / "hidden.npy").stat().st_mtime_ns
    second = cached_text_features(split, backbone, load_tokenizer("tiny"), 40, torch.device("cpu"))
    assert second.path == first.path and sum(encoder_calls) == 100  # no second encode
    assert (second.path / "hidden.npy").stat().st_mtime_ns == stamp
    # A data root where nothing can be created (here: .cache is a file) uses the user's cache dir.
    other = tmp_path / "readonly-data"
    shutil.copytree(data_root, other, ignore=shutil.ignore_patterns(".cache"))
    (other / ".cache").write_text("not a directory")
    moved = cached_text_features(PrecompSplit(other, "dev", 20), backbone, load_tokenizer("tiny"), 40,
                                 torch.device("cpu"))
    assert moved.path.parent == tmp_path / "user-cache" / "itm-study" / "text"
    assert moved.path.name == first.path.name and np.array_equal(moved.hidden, first.hidden)
    (tmp_path / "blocked").write_text("a file where the user cache should go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocked"))
    with pytest.raises(DataError, match="no writable text-cache directory.*model.cache_text: false"):
        cached_text_features(PrecompSplit(other, "test", 5), backbone, load_tokenizer("tiny"), 40,
                             torch.device("cpu"))


def test_frozen_text_only_with_a_frozen_encoder_and_the_cache_on(data_root):
    split = PrecompSplit(data_root, "dev", 10)
    backbone, tokenizer, cpu = frozen_backbone(), load_tokenizer("tiny"), torch.device("cpu")
    for freeze, cache in ((False, True), (True, False)):
        job = JobConfig(data=DataConfig(root=str(data_root)),
                        model=ModelConfig(text_encoder="tiny", freeze_text=freeze, cache_text=cache))
        assert frozen_text(job, backbone, split, tokenizer, cpu) is None
    job = JobConfig(data=DataConfig(root=str(data_root), max_text_len=12),
                    model=ModelConfig(text_encoder="tiny", freeze_text=True))
    text = frozen_text(job, backbone, split, tokenizer, cpu)
    assert isinstance(text, TextFeatures) and int(np.diff(text.offsets).max()) <= 12


def _race(root: str, barrier, results, lock: bool) -> None:
    """One of several processes asking for the same entry at the same moment."""
    import trainables.data.text_cache as text_cache

    if not lock:  # as on a file system without flock: both encode, the rename decides
        import contextlib
        text_cache.exclusive = lambda path: contextlib.nullcontext()
    torch.set_num_threads(1)
    backbone = frozen_backbone()
    calls = []
    backbone.register_forward_hook(lambda *args: calls.append(1))
    split = PrecompSplit(root, "dev", 40)
    barrier.wait()
    text = cached_text_features(split, backbone, load_tokenizer("tiny"), 40, torch.device("cpu"))
    results.put((str(text.path), len(calls) > 0, float(np.asarray(text.hidden).sum())))


@pytest.mark.parametrize("lock", [True, False], ids=["flock", "no-lock"])
def test_concurrent_writers_leave_one_complete_entry(data_root, lock):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(data_root), barrier, results, lock)) for _ in range(3)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    paths, encoded, sums = zip(*outcomes)
    assert len(set(paths)) == 1 and len(set(sums)) == 1
    if lock:
        assert sum(encoded) == 1  # one process encoded; the others waited and read its entry
    entries = list((data_root / ".cache" / "text").iterdir())
    assert [p.name for p in entries if p.is_dir()] == [Path(paths[0]).name]  # no torn or leftover temp dirs
    expected = cached_text_features(PrecompSplit(data_root, "dev", 40), frozen_backbone(),
                                    load_tokenizer("tiny"), 40, torch.device("cpu"))
    assert str(expected.path) == paths[0] and float(np.asarray(expected.hidden).sum()) == sums[0]
    assert expected.hidden.shape[0] == int(expected.offsets[-1])


def test_a_killed_encode_leaves_nothing_behind_once_the_entry_is_built(data_root):
    """A writer killed mid-encode (SIGKILL, OOM) cannot clean up; the next writer, holding the key's
    lock, removes its half-written temp directory before encoding."""
    split, backbone, tokenizer = PrecompSplit(data_root, "dev", 10), frozen_backbone(), load_tokenizer("tiny")
    key, _ = cache_key(split, backbone, tokenizer, 40)
    base = data_root / ".cache" / "text"
    dead = base / f".{key}.tmp-killed"
    dead.mkdir(parents=True)
    (dead / "hidden.npy").write_bytes(b"torn")
    other = base / ".another-key.tmp-live"  # another key's writer may still be running: left alone
    other.mkdir()
    text = cached_text_features(split, backbone, tokenizer, 40, torch.device("cpu"))
    assert text.path == base / key and not dead.exists() and other.exists()


def test_checkpoints_leave_the_frozen_backbone_out_and_resume_checks_it(data_root, tmp_path):
    """A frozen encoder never changes, so checkpoints keep only its digest (MiniLM would be 91 MB of
    every epoch's checkpoint); resuming rebuilds it and refuses a backbone with other weights."""
    from trainables.errors import ITMError
    from trainables.loop import CHECKPOINT_FILE, FROZEN_TEXT

    job = tiny_job(data_root, cache=True)
    one_epoch = job.model_copy(update={"train": job.train.model_copy(update={"epochs": 1})})
    first = fit(one_epoch, LocalReporter(tmp_path / "run"))
    state = torch.load(tmp_path / "run" / "checkpoint_0001" / CHECKPOINT_FILE, weights_only=True)
    assert state["frozen_text"] and not any(key.startswith(FROZEN_TEXT) for key in state["model"])
    assert any(key.startswith("text_encoder.proj.") for key in state["model"])  # the trained part stays
    history = fit(job, LocalReporter(tmp_path / "run"))
    assert [m["epoch"] for m in history] == [1, 2] and history[0] == first[0]
    # Another seed draws another random tiny backbone: not the encoder the checkpoint was trained with.
    other = job.model_copy(update={"train": job.train.model_copy(update={"seed": 1, "epochs": 3})})
    with pytest.raises(ITMError, match="another frozen text encoder"):
        fit(other, LocalReporter(tmp_path / "run"))
