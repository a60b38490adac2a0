"""``python -m study`` / ``itm-study``: parse, validate, call, print. Errors are one line, exit 2."""

from __future__ import annotations

import argparse
import sys

from study.commands import ablate, data, report, resume, run, train
from trainables.errors import ITMError

COMMANDS = (data, train, run, resume, ablate, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="itm-study", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ITMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    sys.exit(main())
