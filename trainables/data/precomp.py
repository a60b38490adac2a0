"""Precomputed region features in the SCAN / VSE∞ "precomp" layout (SPEC.md "Data").

A split ``S`` of a dataset directory ``root`` is three files:

- ``S_ims.npy``   float32 (or float16) array ``[N, R, D]``: R region vectors of dimension D per image.
  Always opened with ``mmap_mode='r'`` — COCO's train file is ~33 GB and must never be read at once.
- ``S_caps.txt``  ``k·N`` lines; captions ``k·i … k·i+k−1`` describe image ``i`` (k is inferred, normally 5).
  Also memory-mapped (:class:`CaptionLines`): only two int64 offsets per caption live in RAM, so a
  process's private memory does not grow with the split, and forked DataLoader workers do not copy
  a list of Python strings page by page as they touch their reference counts.
- ``S_ids.txt``   optional, ``N`` or ``k·N`` lines of source ids (kept for reports, never required).

Every defect is reported as one :class:`~trainables.errors.DataError` line naming the file and the fix,
so the driver can validate a dataset before any Ray worker starts.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, overload

import numpy as np

from trainables.config import DataConfig
from trainables.errors import ConfigError, DataError

# F30K uses train/dev/test, COCO train/dev/testall (5K, evaluated as 5 folds of 1K and as a whole).
KNOWN_SPLITS = ("train", "dev", "test", "testall")
DEV_MAX_IMAGES = 1000  # every reference loader evaluates on the first 1,000 dev images only
FOLD_IMAGES = 1000  # COCO 1K protocol: folds of 1,000 images / 5,000 captions
FEATURE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
SCAN_CHUNK_BYTES = 64 * 2**20  # NaN scan reads the memmap in ~64 MB slabs


class SplitFiles(NamedTuple):
    ims: Path
    caps: Path
    ids: Path


def split_files(root: str | Path, split: str) -> SplitFiles:
    root = Path(root)
    return SplitFiles(root / f"{split}_ims.npy", root / f"{split}_caps.txt", root / f"{split}_ids.txt")


def available_splits(root: str | Path) -> list[str]:
    """Known split names (train/dev/test/testall) with at least one of their files in ``root``."""
    found = []
    for split in KNOWN_SPLITS:
        files = split_files(root, split)
        if files.ims.is_file() or files.caps.is_file():
            found.append(split)
    return found


def _require_root(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"dataset directory {root} does not exist; fix data.root or write the synthetic "
                        f"benchmark there with `python -m study data synth --out {root}`")


def _require_file(path: Path, root: Path, split: str) -> None:
    if path.is_file():
        return
    present = ", ".join(available_splits(root)) or "none"
    raise DataError(f"{path} not found (splits present in {root}: {present}); add the file or point the "
                    f"config at an existing split instead of {split!r}")


def open_features(path: Path) -> np.memmap:
    """Memory-map ``path`` read-only and check its header: rank 3 ``[N, R, D]``, float32/float16, N ≥ 1."""
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path} is not a readable .npy array ({first}); rewrite it with numpy.save") from None
    if images.ndim != 3:
        raise DataError(f"{path} has shape {images.shape} but region features must be rank 3 [N, R, D]; "
                        "for one global vector per image save it as [N, 1, D]")
    if images.dtype not in FEATURE_DTYPES:
        raise DataError(f"{path} has dtype {images.dtype} but features must be float32 or float16; "
                        "convert with arr.astype(numpy.float32) and save again")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(f"{path} has shape {images.shape} with an empty axis; it holds no features")
    return images


def read_lines(path: Path) -> list[str]:
    """The file's lines, stripped; one final newline is allowed, any other blank line is kept (and caught)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not valid UTF-8 (byte {err.start}); re-encode it as UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


class CaptionLines(Sequence[str]):
    """The lines of a UTF-8 text file, stripped, memory-mapped: offsets in RAM, text decoded on access.

    Line semantics are those of :func:`read_lines` (split on ``\\n``, one final newline allowed, each
    line stripped). Construction reads the file once to find the line ends and to check it is UTF-8;
    afterwards ``lines[j]`` decodes one line from the page cache. Slicing gives a view (no copy);
    pickling sends the path and the offsets and re-maps the file on arrival.
    """

    def __init__(self, path: Path, chunk_bytes: int = SCAN_CHUNK_BYTES):
        self.path = Path(path)
        raw = self._map()
        ends, decoder = [], codecs.getincrementaldecoder("utf-8")()
        for start in range(0, len(raw), chunk_bytes):  # chunked: no file-sized temporary
            chunk = raw[start:start + chunk_bytes]
            try:
                decoder.decode(chunk.tobytes(), final=start + chunk_bytes >= len(raw))
            except UnicodeDecodeError as err:
                raise DataError(f"{path} is not valid UTF-8 (byte {start + err.start}); re-encode it as UTF-8") from None
            ends.append(start + np.flatnonzero(chunk == ord("\n")))
        ends = np.concatenate(ends) if ends else np.empty(0, dtype=np.int64)
        if len(raw) and raw[-1] != ord("\n"):
            ends = np.append(ends, len(raw))  # a last line without its newline
        self._starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else ends.astype(np.int64)
        self._ends = ends.astype(np.int64)
        self._raw = raw

    def _map(self) -> np.ndarray:
        if self.path.stat().st_size == 0:
            return np.empty(0, dtype=np.uint8)  # numpy cannot map an empty file
        return np.memmap(self.path, dtype=np.uint8, mode="r")

    def __len__(self) -> int:
        return len(self._starts)

    @overload
    def __getitem__(self, j: int) -> str: ...
    @overload
    def __getitem__(self, j: slice) -> CaptionLines: ...
    def __getitem__(self, j):
        if isinstance(j, slice):
            view = object.__new__(CaptionLines)
            view.path, view._raw = self.path, self._raw
            view._starts, view._ends = self._starts[j], self._ends[j]
            return view
        return self._raw[self._starts[j]:self._ends[j]].tobytes().decode("utf-8").strip()

    def __iter__(self) -> Iterator[str]:
        return (self[j] for j in range(len(self)))

    def __getstate__(self) -> dict:
        return {"path": self.path, "_starts": self._starts, "_ends": self._ends}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._raw = self._map()

    def __repr__(self) -> str:
        return f"CaptionLines({str(self.path)!r}, {len(self)} lines)"


def infer_captions_per_image(n_lines: int, n_images: int, caps: Path, ims: Path) -> int:
    """k = lines / N, which must be a positive integer."""
    if n_lines == 0:
        raise DataError(f"{caps} is empty; it needs k captions per image of {ims.name} (normally 5·{n_images} lines)")
    if n_lines % n_images or n_lines < n_images:
        raise DataError(f"{caps} has {n_lines} lines for {n_images} images in {ims.name}; it needs a whole "
                        f"number k of captions per image (k·{n_images} lines, normally {5 * n_images})")
    return n_lines // n_images


def check_nonempty(captions: Sequence[str], caps: Path) -> None:
    """Raise on the first blank caption line (1-based line number)."""
    empty = next((i for i, caption in enumerate(captions) if not caption), None)
    if empty is not None:
        raise DataError(f"{caps} line {empty + 1} is an empty caption; write the caption text there "
                        "(every line is one caption)")


def read_ids(path: Path, n_images: int, k: int) -> list[str] | None:
    """Optional id file: None if absent, else its lines (N per-image or k·N per-caption ids)."""
    if not path.is_file():
        return None
    ids = read_lines(path)
    if len(ids) not in (n_images, k * n_images):
        raise DataError(f"{path} has {len(ids)} lines but must have one id per image ({n_images}) or per "
                        f"caption ({k * n_images}); fix or delete it (it is optional)")
    return ids


def scan_finite(images: np.ndarray, path: Path, chunk_bytes: int = SCAN_CHUNK_BYTES) -> None:
    """Check every feature is finite, reading ``images [N, R, D]`` in slabs of ~``chunk_bytes``."""
    per_image = images.shape[1] * images.shape[2] * images.itemsize
    step = max(1, chunk_bytes // per_image)
    for start in range(0, images.shape[0], step):
        ok = np.isfinite(images[start:start + step]).all(axis=(1, 2))
        if not ok.all():
            index = start + int(np.argmin(ok))
            kind = "NaN" if np.isnan(images[index]).any() else "infinite"
            raise DataError(f"{path}: image {index} has {kind} region features; re-extract that image's "
                            "features or remove the image and its captions from the split")


def used_images(split: str, n_images: int, max_images: int | None) -> int:
    """How many leading images a loader uses: dev is cut to 1,000; ``max_images`` cuts any split."""
    n = min(n_images, DEV_MAX_IMAGES) if split == "dev" else n_images
    return n if max_images is None else min(n, max_images)


class PrecompSplit:
    """One split, memory-mapped: ``images [n_images, R, D]`` and ``captions`` (k per image, in order).

    Construction runs the cheap checks (files, header, caption count, blank captions, id count);
    the full NaN scan is :func:`validate_split`'s job because it reads the whole feature file.
    """

    def __init__(self, root: str | Path, split: str, max_images: int | None = None):
        if max_images is not None and max_images < 1:
            raise ConfigError(f"data.max_images must be a positive number of images, got {max_images}")
        self.root, self.split, self.max_images = Path(root), split, max_images
        files = split_files(self.root, split)
        _require_root(self.root)
        for path in (files.ims, files.caps):
            _require_file(path, self.root, split)
        full = open_features(files.ims)
        captions = CaptionLines(files.caps)
        k = infer_captions_per_image(len(captions), full.shape[0], files.caps, files.ims)
        check_nonempty(captions, files.caps)
        ids = read_ids(files.ids, full.shape[0], k)
        self.n_images = used_images(split, full.shape[0], max_images)
        self.n_images_on_disk = full.shape[0]
        self.n_ids_on_disk = None if ids is None else len(ids)
        self.captions_per_image = k
        # A leading slice of a memmap is still a memmap: nothing is read until an image is indexed.
        self.images: np.memmap = full[: self.n_images]
        self.captions: CaptionLines = captions[: k * self.n_images]
        per_caption = ids is not None and len(ids) == k * full.shape[0]
        self.ids: list[str] | None = None if ids is None else ids[: (k if per_caption else 1) * self.n_images]

    @property
    def n_regions(self) -> int:
        return self.images.shape[1]

    @property
    def feature_dim(self) -> int:
        return self.images.shape[2]

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def image(self, i: int) -> np.ndarray:
        """Region features of image ``i``: ``[R, D]`` (a read-only view into the memmap)."""
        if not 0 <= i < self.n_images:
            raise IndexError(f"image {i} out of range for {self.split} with {self.n_images} images")
        return self.images[i]

    def caption(self, j: int) -> str:
        """Caption ``j``; it describes image ``j // captions_per_image``."""
        return self.captions[j]

    def image_of_caption(self, j: int) -> int:
        return j // self.captions_per_image

    def __repr__(self) -> str:
        return (f"PrecompSplit({str(self.root)!r}, {self.split!r}: {self.n_images} images x {self.n_regions} "
                f"regions x {self.feature_dim}-d, {self.n_captions} captions)")

    # Pickling a memmap copies the whole array into the pickle (fatal for a 33 GB file when a
    # DataLoader spawns workers or Ray ships the object): send the path and re-open on arrival.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["images"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.images = open_features(split_files(self.root, self.split).ims)[: self.n_images]


def validate_split(root: str | Path, split: str, scan_features: bool = True) -> dict:
    """Every check of :class:`PrecompSplit` plus (by default) a chunked NaN/inf scan of the features.

    Returns a summary: split, images (on disk), used_images (after the dev cut), captions,
    captions_per_image, regions, feature_dim, dtype, ids (line count or None).
    """
    data = PrecompSplit(root, split)
    ims = split_files(root, split).ims
    if scan_features:
        scan_finite(open_features(ims), ims)
    return {
        "split": split,
        "images": data.n_images_on_disk,
        "used_images": data.n_images,
        "captions": data.n_images_on_disk * data.captions_per_image,
        "captions_per_image": data.captions_per_image,
        "regions": data.n_regions,
        "feature_dim": data.feature_dim,
        "dtype": str(data.images.dtype),
        "ids": data.n_ids_on_disk,
    }


def check_eval_protocol(data: DataConfig, test: PrecompSplit | None = None) -> None:
    """``data.eval_protocol: coco_5fold`` needs a test split of whole ``FOLD_IMAGES``-image folds.

    ``test``: the opened test split if the caller has it (else it is opened here, cheap checks only).
    Raises a one-line ConfigError; nothing to check for ``full`` or without a test split.
    """
    if data.eval_protocol != "coco_5fold" or not data.test_split:
        return
    if test is None:
        test = PrecompSplit(data.root, data.test_split, data.max_images)
    if test.n_images % FOLD_IMAGES:
        raise ConfigError(f"data.eval_protocol: coco_5fold needs whole folds of {FOLD_IMAGES} images, but "
                          f"test split {data.test_split!r} has {test.n_images}; use eval_protocol: full "
                          f"or COCO's {5 * FOLD_IMAGES}-image testall without max_images")


def check_dataset(root: str | Path, splits: list[str] | None = None, scan_features: bool = True) -> list[dict]:
    """Validate ``splits`` (default: whichever of train/dev/test/testall exist) and return their summaries."""
    root = Path(root)
    _require_root(root)
    if splits is None:
        splits = available_splits(root)
        if not splits:
            raise DataError(f"no precomp split found in {root}: expected {{split}}_ims.npy + {{split}}_caps.txt "
                            "for train/dev/test (F30K) or train/dev/testall (COCO); "
                            f"write one with `python -m study data synth --out {root}`")
    return [validate_split(root, split, scan_features) for split in dict.fromkeys(splits)]


def describe(summary: dict) -> str:
    """One human line for a :func:`validate_split` summary."""
    cut = "" if summary["used_images"] == summary["images"] else f" (first {summary['used_images']} used)"
    ids = "" if summary["ids"] is None else f", {summary['ids']} ids"
    return (f"{summary['split']}: {summary['images']} images{cut} x {summary['regions']} regions x "
            f"{summary['feature_dim']}-d {summary['dtype']}, {summary['captions']} captions "
            f"({summary['captions_per_image']} per image){ids}")
