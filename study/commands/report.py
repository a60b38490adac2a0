"""``study report DIR``: rebuild a study's (or an ablation's) tables and figures from stored results."""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser("report", help="rebuild tables and plots of a study or ablation directory")
    parser.add_argument("study_dir", help="a study directory (storage.path/NAME) or an ablation (NAME-ablation)")
    parser.add_argument("--top", type=int, default=10, help="trials in the study table (default %(default)s)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from study.report.build import build_report  # imports matplotlib/Optuna: keep --help fast

    report = build_report(args.study_dir, top=args.top)
    print(report.markdown)
    print(f"report  : {report.out_dir}")
    for path in report.files:
        print(f"  {path.name}")
    return 0
