"""``study resume STUDY_DIR``: continue an interrupted study without repeating finished trials."""

from __future__ import annotations

from study.commands import add_address
from study.commands.run import report


def add_parser(sub) -> None:
    parser = sub.add_parser("resume", help="continue an interrupted study")
    parser.add_argument("study_dir", help="the study directory (storage.path/NAME)")
    add_address(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from study.layout import load_study_dir
    from study.search import resume_study

    study = load_study_dir(args.study_dir)[0]
    return report(resume_study(args.study_dir, address=args.address), study)
