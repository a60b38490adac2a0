"""``study sync DIR``: send the MLflow events a study kept while its tracking server was unreachable
(``study/tracking_buffer.py``). Safe to run twice: nothing is sent twice."""

from __future__ import annotations

import sys
from pathlib import Path

from trainables.errors import ConfigError


def add_parser(sub) -> None:
    parser = sub.add_parser("sync", help="send MLflow events kept while the tracking server was unreachable")
    parser.add_argument("study_dir", help="a study or ablation directory (every buffer below it is sent)")
    parser.add_argument("--uri", default=None,
                        help="send to this tracking URI instead of the one the study used")
    parser.set_defaults(run=run)


def run(args) -> int:
    directory = Path(args.study_dir)
    if not directory.is_dir():
        raise ConfigError(f"study directory {directory} does not exist or is not a directory: give the folder "
                          "the study printed (storage.path/NAME)")
    from study.tracking_buffer import sync  # imports MLflow: keep --help fast

    outcomes = sync(directory, args.uri)
    if not outcomes:
        print(f"nothing to send: no MLflow events kept under {directory}")
        return 0
    for folder, sent, left, uri in outcomes:
        print(f"{folder}: sent {sent} events to {uri}, {left} left")
    left = sum(outcome[2] for outcome in outcomes)
    if left:
        print(f"error: MLflow is still unreachable: {left} events kept; run `python -m study sync {directory}` "
              "again when it is back", file=sys.stderr)
        return 1
    return 0
