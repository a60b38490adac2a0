"""The embedded synthetic ITM benchmark (SPEC.md "Data"), written in the precomp layout.

Each image is a small scene: 2–4 objects from a 40-category vocabulary, each with one of 15 attributes
(colour / size / material), linked by pairwise relations (on, under, next to, behind, holding, …).

- **Image side.** Every object (with its attribute) and every relation becomes one region. A region's
  latent vector (sum of fixed random embeddings of its object / attribute / relation roles) goes through
  a FIXED random 2-layer tanh MLP to ``feature_dim``; then a constant image-modality offset of norm
  ``gap·sqrt(D)`` (the modality gap) and Gaussian noise of std ``noise`` per dimension are added.
  Remaining region slots hold "clutter" (real objects the captions never mention) and background
  regions (random latents through the same map). Region order is shuffled per image.
  The map, the embeddings and the offset come from ``world_seed`` so all splits share one "world".
- **Text side.** Five English captions per image, each mentioning a random subset of the objects and
  relations in a random order, through synonyms (car / automobile / vehicle), optional attributes,
  inverted relations ("a cup under a dog" for "a dog on a cup") and paraphrase templates, so the
  image-text mapping has to be learned rather than matched by string.

Difficulty knobs: ``noise``, ``gap``, ``min_objects``/``max_objects``, ``clutter`` (unmentioned objects
per image), ``attribute_drop`` (how often a caption omits an attribute).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from trainables.errors import ConfigError

# Category -> synonyms used in captions (the first is the canonical name).
OBJECTS = (
    ("car", "automobile", "vehicle"), ("dog", "puppy", "hound"), ("cat", "kitten", "kitty"),
    ("man", "guy", "gentleman"), ("woman", "lady"), ("child", "kid", "youngster"),
    ("bicycle", "bike", "cycle"), ("bus", "coach"), ("truck", "lorry", "pickup"),
    ("boat", "ship", "vessel"), ("horse", "pony", "stallion"), ("bird", "sparrow", "songbird"),
    ("cow", "cattle", "calf"), ("sheep", "lamb", "ewe"), ("table", "desk"), ("chair", "seat", "stool"),
    ("sofa", "couch", "settee"), ("bed", "mattress", "cot"), ("lamp", "lantern", "light"),
    ("cup", "mug", "teacup"), ("bottle", "flask", "jug"), ("bowl", "basin", "dish"),
    ("plate", "platter", "saucer"), ("laptop", "notebook computer", "computer"),
    ("phone", "cellphone", "smartphone"), ("book", "novel", "paperback"), ("clock", "timepiece", "watch"),
    ("vase", "urn", "jar"), ("umbrella", "parasol", "brolly"), ("bag", "handbag", "purse"),
    ("hat", "cap", "beanie"), ("ball", "football", "sphere"), ("kite",), ("bench", "park bench", "pew"),
    ("tree", "sapling", "oak"), ("flower", "blossom", "bloom"), ("box", "crate", "carton"),
    ("television", "tv", "monitor"), ("guitar", "acoustic guitar", "ukulele"),
    ("skateboard", "board", "longboard"),
)
PEOPLE = frozenset({"man", "woman", "child"})  # only they can be "holding" something
ATTRIBUTES = (
    ("red", "crimson", "scarlet"), ("blue", "navy", "azure"), ("green", "emerald", "olive"),
    ("yellow", "golden", "lemon"), ("black", "dark", "jet-black"), ("white", "pale", "snowy"),
    ("brown", "tan", "chocolate"), ("pink", "rosy", "salmon"),
    ("small", "little", "tiny"), ("large", "big", "huge"), ("old", "worn", "vintage"),
    ("wooden", "timber", "wood"), ("metal", "metallic", "steel"), ("plastic", "synthetic", "vinyl"),
    ("glass", "glassy", "crystal"),
)
# Relation -> (phrasings of "A rel B", phrasings of the inverse "B inv A").
RELATIONS = (
    (("on", "on top of", "resting on"), ("under", "beneath", "below")),
    (("under", "beneath", "below"), ("on", "on top of", "above")),
    (("next to", "beside", "alongside"), ("next to", "beside", "by")),
    (("behind", "in back of"), ("in front of", "ahead of")),
    (("in front of", "ahead of"), ("behind", "in back of")),
    (("holding", "carrying", "gripping"), ("held by", "carried by", "in the hands of")),
    (("to the left of", "left of"), ("to the right of", "right of")),
    (("to the right of", "right of"), ("to the left of", "left of")),
)
HOLDING = 5
N_BACKGROUND = 12  # background "stuff" latents (sky, wall, ...) never named in captions
LATENT_DIM, HIDDEN_DIM = 64, 512
SPLITS = ("train", "dev", "test")
CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class SynthParams:
    """Generator parameters (written to ``synth.json``)."""

    images: int = 2000  # train images; dev = max(100, images//4), test = max(1, images//2)
    seed: int = 0  # scenes and captions
    world_seed: int = 0  # the fixed random map, embeddings and modality offset shared by all splits
    regions: int = 12
    feature_dim: int = 256
    gap: float = 1.0  # image-modality offset norm, in units of the typical feature norm
    noise: float = 0.3  # per-dimension Gaussian noise std (features have ~unit variance)
    min_objects: int = 2
    max_objects: int = 4
    clutter: int = 1  # unmentioned vocabulary objects per image (hard distractors)
    attribute_drop: float = 0.25  # probability a caption names an object without its attribute

    def validate(self) -> None:
        needed = 2 * self.max_objects - 1 + self.clutter
        checks = [
            (self.images >= 1, f"images must be >= 1, got {self.images}"),
            (1 <= self.min_objects <= self.max_objects <= len(OBJECTS) - self.clutter,
             f"need 1 <= min_objects <= max_objects <= {len(OBJECTS) - self.clutter}, "
             f"got {self.min_objects}..{self.max_objects}"),
            (self.clutter >= 0, f"clutter must be >= 0, got {self.clutter}"),
            (self.regions >= needed, f"regions={self.regions} is too few for max_objects={self.max_objects} "
                                     f"and clutter={self.clutter}: need at least {needed}"),
            (self.feature_dim >= 1, f"feature_dim must be >= 1, got {self.feature_dim}"),
            (self.gap >= 0 and self.noise >= 0, f"gap and noise must be >= 0, got {self.gap}, {self.noise}"),
            (0 <= self.attribute_drop <= 1, f"attribute_drop must be in [0, 1], got {self.attribute_drop}"),
            (self.seed >= 0 and self.world_seed >= 0, f"seeds must be >= 0, got {self.seed}, {self.world_seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"synthetic benchmark: {message}")

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.images, "dev": max(100, self.images // 4), "test": max(1, self.images // 2)}


INSTANCE_JITTER = 0.25  # latent variation between two instances of "a red car"


@dataclass(frozen=True)
class World:
    """The fixed random map from latents to region features, shared by every split of one dataset."""

    objects: np.ndarray  # [n_objects, LATENT_DIM] category embeddings
    attributes: np.ndarray  # [n_attributes, LATENT_DIM]
    relations: np.ndarray  # [n_relations, LATENT_DIM]
    background: np.ndarray  # [N_BACKGROUND, LATENT_DIM]
    subject_role: np.ndarray  # [LATENT_DIM, LATENT_DIM] rotations: "dog on cup" != "cup on dog"
    object_role: np.ndarray  # [LATENT_DIM, LATENT_DIM]
    w1: np.ndarray  # [LATENT_DIM, HIDDEN_DIM]
    b1: np.ndarray  # [HIDDEN_DIM]
    w2: np.ndarray  # [HIDDEN_DIM, D]
    scale: float  # makes mapped features ~unit variance per dimension
    offset: np.ndarray  # [D] image-modality offset direction, norm sqrt(D)

    def features(self, latents: np.ndarray) -> np.ndarray:
        """``latents [..., LATENT_DIM]`` -> features ``[..., D]`` (float64): scale · W2 tanh(W1 z + b1)."""
        # One 2-D GEMM: numpy runs a stacked (3-D) matmul as many tiny BLAS calls, which is ~100x
        # slower once torch's OpenMP threads compete with OpenBLAS's.
        flat = latents.reshape(-1, LATENT_DIM)
        out = self.scale * (np.tanh(flat @ self.w1 + self.b1) @ self.w2)
        return out.reshape(*latents.shape[:-1], self.w2.shape[1])


def build_world(world_seed: int, feature_dim: int) -> World:
    """Draw the embeddings, role rotations, random MLP and modality offset from ``world_seed`` alone."""
    rng = np.random.default_rng(np.random.SeedSequence([world_seed, 7919]))

    def embed(n: int) -> np.ndarray:  # unit-norm-ish rows
        return rng.standard_normal((n, LATENT_DIM)) / np.sqrt(LATENT_DIM)

    def rotation() -> np.ndarray:
        q, _ = np.linalg.qr(rng.standard_normal((LATENT_DIM, LATENT_DIM)))
        return q

    tables = dict(objects=embed(len(OBJECTS)), attributes=embed(len(ATTRIBUTES)), relations=embed(len(RELATIONS)),
                  background=embed(N_BACKGROUND), subject_role=rotation(), object_role=rotation())
    w1 = rng.standard_normal((LATENT_DIM, HIDDEN_DIM))  # pre-activations ~N(0, |z|^2): tanh saturates
    b1 = 0.5 * rng.standard_normal(HIDDEN_DIM)
    w2 = rng.standard_normal((HIDDEN_DIM, feature_dim)) / np.sqrt(HIDDEN_DIM)
    offset = rng.standard_normal(feature_dim)
    offset *= np.sqrt(feature_dim) / np.linalg.norm(offset)
    world = World(**tables, w1=w1, b1=b1, w2=w2, scale=1.0, offset=offset)
    probe = tables["objects"][rng.integers(len(OBJECTS), size=512)] + tables["attributes"][
        rng.integers(len(ATTRIBUTES), size=512)]
    return replace(world, scale=float(1.0 / world.features(probe).std()))


@dataclass(frozen=True)
class Scene:
    """The latent content of one image (indices into OBJECTS / ATTRIBUTES / RELATIONS)."""

    objects: list[int]  # category per mentioned object
    attributes: list[int]  # attribute per mentioned object
    relations: list[tuple[int, int, int]]  # (subject position, relation, object position) into objects
    clutter: list[tuple[int, int]]  # (category, attribute) of objects present but never mentioned


def sample_relation(rng: np.random.Generator, subject: int, other: int) -> tuple[int, int, int]:
    """A relation between two objects; only people hold things (swap roles or pick another relation)."""
    rel = int(rng.integers(len(RELATIONS)))
    if rel == HOLDING and OBJECTS[subject][0] not in PEOPLE:
        if OBJECTS[other][0] in PEOPLE:
            return other, rel, subject
        rel = int(rng.choice([r for r in range(len(RELATIONS)) if r != HOLDING]))
    return subject, rel, other


def sample_scene(rng: np.random.Generator, p: SynthParams) -> Scene:
    """2–4 distinct objects in a random tree of relations (each new object relates to an earlier one)."""
    n = int(rng.integers(p.min_objects, p.max_objects + 1))
    cats = [int(c) for c in rng.choice(len(OBJECTS), size=n + p.clutter, replace=False)]
    attrs = [int(a) for a in rng.integers(len(ATTRIBUTES), size=n + p.clutter)]
    relations = []
    for t in range(1, n):
        a, b = (t, int(rng.integers(t))) if rng.random() < 0.5 else (int(rng.integers(t)), t)
        s_cat, rel, o_cat = sample_relation(rng, cats[a], cats[b])
        relations.append((a, rel, b) if s_cat == cats[a] else (b, rel, a))
    return Scene(cats[:n], attrs[:n], relations, list(zip(cats[n:], attrs[n:])))


def scene_latents(world: World, scene: Scene, regions: int, rng: np.random.Generator) -> np.ndarray:
    """Region latents ``[regions, LATENT_DIM]``: objects, relations, clutter, background; shuffled."""
    rows = [world.objects[o] + world.attributes[a] for o, a in zip(scene.objects, scene.attributes)]
    for s, rel, o in scene.relations:
        rows.append(world.subject_role @ world.objects[scene.objects[s]] + world.relations[rel]
                    + world.object_role @ world.objects[scene.objects[o]])
    rows += [world.objects[o] + world.attributes[a] for o, a in scene.clutter]
    n_background = regions - len(rows)
    background = world.background[rng.integers(N_BACKGROUND, size=n_background)]
    background = background + 0.5 * rng.standard_normal(background.shape) / np.sqrt(LATENT_DIM)
    latents = np.concatenate([np.stack(rows), background])
    latents += INSTANCE_JITTER * rng.standard_normal(latents.shape) / np.sqrt(LATENT_DIM)
    return latents[rng.permutation(regions)]


def image_features(world: World, latents: np.ndarray, p: SynthParams, rng: np.random.Generator) -> np.ndarray:
    """``latents [N, R, LATENT_DIM]`` -> float32 ``[N, R, D]``: map + gap·offset + noise."""
    feats = world.features(latents) + p.gap * world.offset
    feats += p.noise * rng.standard_normal(feats.shape)
    return feats.astype(np.float32)


# Paraphrase frames; every one takes a noun phrase / clause and yields a sentence.
SCENE_PREFIXES = ("", "", "there is ", "a photo of ", "an image of ", "we can see ", "a picture showing ")
LIST_PREFIXES = ("", "a scene with ", "a photo showing ", "an image containing ", "there are ")
# A clause stands alone ("a dog sits on a bed") or follows a prefix ("there is a dog sitting on a bed").
FINITE_VERBS = ("", "is ", "is ", "sits ", "stands ")
PARTICIPLES = ("", "", "sitting ", "standing ", "lying ")
CLAUSE_JOINS = (" and ", ", while ", ", and ", " as ")


def pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def noun_phrase(rng: np.random.Generator, scene: Scene, i: int, drop: float) -> str:
    """'a crimson automobile' / 'a car' (attribute omitted with probability ``drop``)."""
    words = pick(rng, OBJECTS[scene.objects[i]])
    if rng.random() >= drop:
        words = f"{pick(rng, ATTRIBUTES[scene.attributes[i]])} {words}"
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def relation_clause(rng: np.random.Generator, scene: Scene, k: int, drop: float, finite: bool) -> str:
    """One relation, stated forwards ('a man holding a cup') or inverted ('a cup held by a man')."""
    s, rel, o = scene.relations[k]
    forward, inverse = RELATIONS[rel]
    inverted = rng.random() < 0.35
    if inverted:
        s, o = o, s
    if rel == HOLDING:  # "a man is holding a cup", "a cup is held by a man"; never "a cup sits held by"
        verb = pick(rng, ("", "is ")) if finite else ""
    else:
        verb = pick(rng, FINITE_VERBS if finite else PARTICIPLES)
    phrase = pick(rng, inverse if inverted else forward)
    return f"{noun_phrase(rng, scene, s, drop)} {verb}{phrase} {noun_phrase(rng, scene, o, drop)}"


def object_list(rng: np.random.Generator, scene: Scene, positions: list[int], drop: float) -> str:
    phrases = [noun_phrase(rng, scene, i, drop) for i in positions]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(rng: np.random.Generator, scene: Scene, drop: float) -> str:
    """One sentence about a random subset of the scene, in a random paraphrase."""
    n_rel, kind = len(scene.relations), rng.random()
    if n_rel == 0 or kind < 0.25:  # a list of 2+ objects (or all there is), in random order
        size = int(rng.integers(min(2, len(scene.objects)), len(scene.objects) + 1))
        order = [int(i) for i in rng.permutation(len(scene.objects))[:size]]
        text = pick(rng, LIST_PREFIXES) + object_list(rng, scene, order, drop)
    elif n_rel >= 2 and kind < 0.55:  # two relations joined
        first, second = (int(k) for k in rng.permutation(n_rel)[:2])
        text = relation_clause(rng, scene, first, drop, True) + pick(rng, CLAUSE_JOINS) + relation_clause(
            rng, scene, second, drop, True)
    else:  # one relation, sometimes with another object mentioned
        k = int(rng.integers(n_rel))
        prefix = pick(rng, SCENE_PREFIXES)
        text = prefix + relation_clause(rng, scene, k, drop, finite=not prefix)
        rest = [i for i in range(len(scene.objects)) if i not in scene.relations[k][::2]]
        if rest and rng.random() < 0.4:
            text += pick(rng, (" with ", " and ", ", plus ")) + noun_phrase(rng, scene, int(rng.choice(rest)), drop)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + ("." if rng.random() < 0.5 else "")


def generate_split(world: World, p: SynthParams, n_images: int, split_seed: np.random.SeedSequence
                   ) -> tuple[np.ndarray, list[str]]:
    """``n_images`` scenes -> (features float32 ``[n_images, R, D]``, 5·n_images captions)."""
    scene_rng, region_rng, caption_rng, noise_rng = (np.random.default_rng(s) for s in split_seed.spawn(4))
    scenes = [sample_scene(scene_rng, p) for _ in range(n_images)]
    latents = np.stack([scene_latents(world, scene, p.regions, region_rng) for scene in scenes])
    captions = [caption(caption_rng, scene, p.attribute_drop) for scene in scenes for _ in range(CAPTIONS_PER_IMAGE)]
    return image_features(world, latents, p, noise_rng), captions


def write_synth(out: str | Path, images: int = 2000, seed: int = 0, regions: int = 12, feature_dim: int = 256,
                gap: float = 1.0, noise: float = 0.3, **knobs) -> dict:
    """Write train/dev/test (+ ``synth.json``) in the precomp layout under ``out``; returns the metadata.

    ``knobs`` are the other :class:`SynthParams` fields (world_seed, min_objects, max_objects, clutter,
    attribute_drop). Same arguments -> byte-identical files. Everything is generated in memory first
    and each file is written under a temporary name then renamed, so a failure leaves nothing half-written.
    """
    unknown = set(knobs) - set(SynthParams.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"synthetic benchmark: unknown parameter(s) {sorted(unknown)}; valid: "
                          f"{sorted(SynthParams.__dataclass_fields__)}")
    p = SynthParams(images=images, seed=seed, regions=regions, feature_dim=feature_dim, gap=gap, noise=noise,
                    **knobs)
    p.validate()
    world = build_world(p.world_seed, p.feature_dim)
    seeds = np.random.SeedSequence([p.seed, 104729]).spawn(len(SPLITS))
    sizes = p.split_sizes()
    files: dict[str, bytes | np.ndarray] = {}
    for split, split_seed in zip(SPLITS, seeds):
        feats, captions = generate_split(world, p, sizes[split], split_seed)
        files[f"{split}_ims.npy"] = feats
        files[f"{split}_caps.txt"] = ("\n".join(captions) + "\n").encode()
        files[f"{split}_ids.txt"] = "".join(f"synth-{split}-{i:06d}\n" for i in range(sizes[split])).encode()
    meta = {"generator": "trainables.data.synth", "version": 1, **asdict(p), "splits": sizes,
            "captions_per_image": CAPTIONS_PER_IMAGE}
    files["synth.json"] = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    write_atomically(Path(out), files)
    return meta


def write_atomically(out: Path, files: dict[str, bytes | np.ndarray]) -> None:
    """Write every file as ``name.tmp`` first, then rename them all (renames are atomic per file)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        with open(out / f"{name}.tmp", "wb") as handle:
            if isinstance(content, np.ndarray):
                np.save(handle, content, allow_pickle=False)
            else:
                handle.write(content)
    for name in files:
        os.replace(out / f"{name}.tmp", out / name)
