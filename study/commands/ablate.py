"""``study ablate STUDY.yaml``: the method's ablation rows × seeds at fixed hyperparameters, as a table."""

from __future__ import annotations

from study.ablation.plan import seeds_override
from study.commands import add_address, add_overrides
from study.config import load_study
from trainables.errors import ConfigError


def add_parser(sub) -> None:
    parser = sub.add_parser("ablate", help="run the ablation grid (rows × seeds) and write the ablation table")
    parser.add_argument("study", help="study YAML file (ablation: {variants, seeds})")
    parser.add_argument("--from-study", default=None, metavar="DIR_OR_NAME",
                        help="fix the hyperparameters at the best trial of this earlier study "
                             "(a study directory, or a study name under storage.path)")
    parser.add_argument("--seeds", default=None, metavar="0,1,2", help="seeds per row (overrides ablation.seeds)")
    add_overrides(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue this study's interrupted ablation (its stored rows, seeds and values)")
    add_address(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.resume and args.from_study:
        raise ConfigError("--resume continues with the values the ablation started with; drop --from-study")
    study = load_study(args.study, [*args.overrides, *seeds_override(args.seeds)])
    from study.ablation.run import (  # imports Ray and MLflow: keep --help and study-file errors fast
        resume_ablation,
        run_ablation,
    )

    if args.resume:
        outcome = resume_ablation(study, address=args.address)
    else:
        outcome = run_ablation(study, from_study=args.from_study, address=args.address)
    print("\n" + outcome.markdown)
    print("table   : " + ", ".join(str(path) for path in outcome.files))
    print(f"trials  : {outcome.ablation_dir / 'results.csv'}")
    print(f"MLflow  : mlflow ui --backend-store-uri {study.tracking.uri}  (run '{study.name}-ablation')")
    if outcome.interrupted:
        print(f"interrupted: continue with `python -m study ablate {args.study} --resume`")
        return 130
    return 0
