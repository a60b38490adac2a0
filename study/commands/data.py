"""``data synth --out DIR`` writes the synthetic benchmark; ``data check DIR`` validates a precomp dataset."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from trainables.data.precomp import check_dataset, describe
from trainables.data.synth import SynthParams, write_synth
from trainables.errors import ConfigError, DataError

DEFAULTS = SynthParams()


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("data", help="write the synthetic benchmark or validate a dataset",
                                   description=__doc__)
    sub = parser.add_subparsers(dest="data_command", required=True)
    synth = sub.add_parser("synth", help="write the synthetic benchmark (train/dev/test) in the precomp layout")
    synth.add_argument("--out", required=True, help="output directory (created if needed; must be empty)")
    synth.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its files")
    synth.add_argument("--images", type=int, default=DEFAULTS.images,
                       help="train images; dev gets max(100, N/4), test N/2 (default %(default)s)")
    synth.add_argument("--seed", type=int, default=DEFAULTS.seed, help="scene/caption seed (default %(default)s)")
    synth.add_argument("--regions", type=int, default=DEFAULTS.regions, help="regions per image (default %(default)s)")
    synth.add_argument("--feature-dim", type=int, default=DEFAULTS.feature_dim,
                       help="region feature dimension (default %(default)s)")
    synth.add_argument("--gap", type=float, default=DEFAULTS.gap,
                       help="modality-gap offset, relative to the feature norm (default %(default)s)")
    synth.add_argument("--noise", type=float, default=DEFAULTS.noise,
                       help="Gaussian feature noise std (default %(default)s)")
    synth.add_argument("--max-objects", type=int, default=DEFAULTS.max_objects,
                       help="most described objects per image, 2+ (default %(default)s)")
    synth.add_argument("--clutter", type=int, default=DEFAULTS.clutter,
                       help="undescribed objects per image (default %(default)s)")
    check = sub.add_parser("check", help="validate train/dev/test/testall of a precomp dataset")
    check.add_argument("root", help="dataset directory")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return {"synth": run_synth, "check": run_check}[args.data_command](args)


def check_out(out: Path, force: bool) -> None:
    """``--out`` is a directory to create, or an empty one; a dataset there is never overwritten
    silently (splits the benchmark does not write would survive beside it)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"data synth --out {out}: is a file, not a directory; name a new directory")
    if out.is_dir() and not force and any(out.iterdir()):
        raise ConfigError(f"data synth --out {out}: the directory is not empty; name a new directory, "
                          "or add --force to replace its files")


def run_synth(args: argparse.Namespace) -> int:
    check_out(Path(args.out), args.force)
    start = time.perf_counter()
    meta = write_synth(args.out, images=args.images, seed=args.seed, regions=args.regions,
                       feature_dim=args.feature_dim, gap=args.gap, noise=args.noise,
                       max_objects=args.max_objects, clutter=args.clutter)
    sizes = ", ".join(f"{split} {n}" for split, n in meta["splits"].items())
    print(f"wrote {args.out} ({sizes} images, {meta['captions_per_image']} captions each, "
          f"{args.regions}x{args.feature_dim} regions) in {time.perf_counter() - start:.1f}s")
    return 0


def run_check(args: argparse.Namespace) -> int:
    # A bad dataset is this command's normal verdict, so it reports here rather than raising.
    try:
        summaries = check_dataset(args.root)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for summary in summaries:
        print(describe(summary))
    print(f"ok: {args.root}")
    return 0
