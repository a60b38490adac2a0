"""The synthetic benchmark: determinism, layout, captions, knobs, and that the features carry the scene."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from trainables.data.precomp import PrecompSplit, check_dataset
from trainables.data.synth import (
    OBJECTS,
    SynthParams,
    build_world,
    caption,
    image_features,
    sample_scene,
    scene_latents,
    write_synth,
)
from trainables.errors import ConfigError

SMALL = dict(images=24, regions=8, feature_dim=16)
FILES = [f"{split}_{kind}" for split in ("train", "dev", "test") for kind in ("ims.npy", "caps.txt", "ids.txt")]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    meta = write_synth(root, seed=3, **SMALL)
    return root, meta


def read_all(root) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in FILES + ["synth.json"]}


def test_same_seed_gives_identical_bytes_and_another_seed_differs(small, tmp_path):
    root, _ = small
    write_synth(tmp_path / "again", seed=3, **SMALL)
    write_synth(tmp_path / "other", seed=4, **SMALL)
    assert read_all(tmp_path / "again") == read_all(root)
    other = read_all(tmp_path / "other")
    for name in ("train_ims.npy", "train_caps.txt", "test_ims.npy", "test_caps.txt"):
        assert other[name] != read_all(root)[name], name


def test_layout_sizes_and_metadata(small):
    root, meta = small
    summaries = {s["split"]: s for s in check_dataset(root)}
    assert {split: s["images"] for split, s in summaries.items()} == {"train": 24, "dev": 100, "test": 12}
    assert all(s["captions_per_image"] == 5 and s["dtype"] == "float32" for s in summaries.values())
    on_disk = json.loads((root / "synth.json").read_text())
    assert on_disk == meta and on_disk["noise"] == 0.3 and on_disk["seed"] == 3 and on_disk["regions"] == 8
    assert not list(root.glob("*.tmp"))


def test_split_sizes_follow_the_images_knob():
    assert SynthParams(images=2000).split_sizes() == {"train": 2000, "dev": 500, "test": 1000}


def test_captions_are_five_nonempty_single_lines_per_image(small):
    root, _ = small
    for split in ("train", "dev", "test"):
        data = PrecompSplit(root, split)
        assert data.n_captions == 5 * data.n_images
        assert all(c.strip() and "\n" not in c for c in data.captions)
    assert len(set(PrecompSplit(root, "dev").captions)) > 400  # paraphrases, not copies


def _mentioned(text: str, category: int) -> bool:
    return any(re.search(rf"\b{re.escape(word)}\b", text.lower()) for word in OBJECTS[category])


def test_captions_mention_two_scene_objects_and_never_the_clutter():
    params = SynthParams(clutter=2)
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng, params)
        for _ in range(5):
            text = caption(rng, scene, drop=0.25)
            assert sum(_mentioned(text, o) for o in scene.objects) >= 2, text
            assert not any(_mentioned(text, o) for o, _ in scene.clutter), text


def test_scenes_respect_the_object_knobs_and_only_people_hold_things():
    params = SynthParams(min_objects=3, max_objects=3, clutter=1)
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = sample_scene(rng, params)
        assert len(scene.objects) == 3 and len(scene.relations) == 2 and len(scene.clutter) == 1
        assert len(set(scene.objects) | {scene.clutter[0][0]}) == 4
        for s, rel, _ in scene.relations:
            assert rel != 5 or OBJECTS[scene.objects[s]][0] in {"man", "woman", "child"}


def test_gap_is_a_constant_image_offset(tmp_path):
    write_synth(tmp_path / "g0", gap=0.0, **SMALL)
    write_synth(tmp_path / "g2", gap=2.0, **SMALL)
    shift = np.load(tmp_path / "g2/train_ims.npy") - np.load(tmp_path / "g0/train_ims.npy")
    offset = shift[0, 0]
    assert np.allclose(shift, offset, atol=1e-5)
    assert np.linalg.norm(offset) == pytest.approx(2.0 * np.sqrt(16), rel=1e-4)


def object_probe_accuracy(noise: float, n_train: int = 800, n_test: int = 200) -> float:
    """Ridge probe from mean-pooled regions to the scene's objects: top-n precision on held-out images."""
    params = SynthParams(noise=noise, regions=8, feature_dim=64)
    world, rng = build_world(0, 64), np.random.default_rng(0)
    scenes = [sample_scene(rng, params) for _ in range(n_train + n_test)]
    latents = np.stack([scene_latents(world, s, params.regions, rng) for s in scenes])
    x = image_features(world, latents, params, rng).mean(axis=1).astype(np.float64)
    x = np.concatenate([x - x[:n_train].mean(0), np.ones((len(x), 1))], axis=1)
    y = np.zeros((len(scenes), len(OBJECTS)))
    for row, scene in enumerate(scenes):
        y[row, scene.objects] = 1
    w = np.linalg.solve(x[:n_train].T @ x[:n_train] + 1.0 * np.eye(x.shape[1]), x[:n_train].T @ y[:n_train])
    scores = x[n_train:] @ w
    hits = [np.isin(np.argsort(-s)[: len(scene.objects)], scene.objects).mean()
            for s, scene in zip(scores, scenes[n_train:])]
    return float(np.mean(hits))


def test_features_carry_the_scene_and_noise_hides_it():
    chance = 3 / len(OBJECTS)  # ~0.075; measured: 0.49 at noise 0.3, 0.08 at noise 30
    assert object_probe_accuracy(noise=0.3) > 4 * chance
    assert object_probe_accuracy(noise=30.0) < 2 * chance


@pytest.mark.parametrize("bad,words", [
    (dict(images=0), "images must be >= 1"),
    (dict(regions=4), "regions=4 is too few"),
    (dict(noise=-1.0), "gap and noise"),
    (dict(seed=-1), "seeds must be >= 0"),
    (dict(min_objects=3, max_objects=2), "min_objects"),
    (dict(colour="red"), "unknown parameter"),
])
def test_bad_parameters_are_one_line_config_errors(tmp_path, bad, words):
    with pytest.raises(ConfigError, match=words):
        write_synth(tmp_path, **{**SMALL, **bad})
    assert not list(tmp_path.iterdir())  # nothing written
