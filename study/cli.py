"""``python -m study`` / ``itm-study``: parse, validate, call, print. Errors are one line, exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from trainables.errors import ITMError

# Command name -> its module (``add_parser(subparsers)``, ``run(args) -> int``). Only the module of
# the command being run is imported: ``data`` loads numpy/torch, ``ablate`` pandas, and a bad
# study file should fail in a fraction of a second (docs/cluster.md "When things go wrong").
COMMANDS = {name: f"study.commands.{name}"
            for name in ("data", "train", "run", "resume", "ablate", "report", "sync")}


def chosen_command(argv: list[str]) -> str | None:
    """The command ``argv`` names (its first word: the top-level parser takes no other options)."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return first if first in COMMANDS else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser for ``--help`` and typos (every command's module loaded); for a named command,
    only that command's arguments, the others registered by name."""
    parser = argparse.ArgumentParser(prog="itm-study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = chosen_command(sys.argv[1:] if argv is None else argv)
    for name, module in COMMANDS.items():
        if chosen is None or name == chosen:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        return args.run(args)
    except ITMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C, or SIGTERM once Ray runs (study/ray_session.py)
        print("interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    sys.exit(main())
