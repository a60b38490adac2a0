"""``study ablate STUDY.yaml``: the method's ablation rows × seeds at fixed hyperparameters, as a table.

The rows' values: the study file's, ``--from-study`` (one earlier search's best trial for every row)
or ``--tune-rows N`` (every row, base included, gets its own N-trial search first)."""

from __future__ import annotations

from study.ablation.plan import check_sources, describe_source, seeds_override
from study.commands import add_address, add_overrides
from study.config import load_study
from trainables.errors import ConfigError


def add_parser(sub) -> None:
    parser = sub.add_parser("ablate", help="run the ablation grid (rows × seeds) and write the ablation table")
    parser.add_argument("study", help="study YAML file (ablation: {variants, seeds})")
    parser.add_argument("--from-study", default=None, metavar="DIR_OR_NAME",
                        help="fix the hyperparameters at the best trial of this earlier study "
                             "(a study directory, or a study name under storage.path)")
    parser.add_argument("--pick", default=None, metavar="RULE",
                        help="which trial of --from-study: best:METRIC (best by that objective, within the "
                             "Pareto set of a multi-objective study; default: the first objective) or trial:ID")
    parser.add_argument("--tune-rows", type=int, default=None, metavar="N",
                        help="give every row (base included) its own N-trial search (TPE + ASHA, the study's "
                             "search space less what the row switches off) and run each at its best values")
    parser.add_argument("--seeds", default=None, metavar="0,1,2", help="seeds per row (overrides ablation.seeds)")
    add_overrides(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue this study's interrupted ablation (its stored rows, seeds and values)")
    add_address(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    check_sources(args.from_study, args.tune_rows, args.pick)
    if args.resume and (args.from_study is not None or args.tune_rows is not None):
        flag = "--from-study" if args.from_study is not None else "--tune-rows"
        raise ConfigError("--resume continues with the values (or row searches) the ablation started "
                          f"with; drop {flag}")
    study = load_study(args.study, [*args.overrides, *seeds_override(args.seeds)])
    from study.ablation.run import (  # imports Ray and MLflow: keep --help and study-file errors fast
        resume_ablation,
        run_ablation,
    )

    if args.resume:
        outcome = resume_ablation(study, address=args.address)
    else:
        outcome = run_ablation(study, from_study=args.from_study, address=args.address,
                               tune_rows=args.tune_rows, pick=args.pick)
    for line in describe_source(outcome.source):
        print("row search: " + line)
    if "pick" in outcome.source:
        print(f"values  : trial {outcome.source['trial_id']} of {outcome.source['from_study']} "
              f"({outcome.source['pick']})")
    if outcome.markdown:
        print("\n" + outcome.markdown)
        print("table   : " + ", ".join(str(path) for path in outcome.files))
    print(f"trials  : {outcome.ablation_dir / 'results.csv'}")
    print(f"MLflow  : mlflow ui --backend-store-uri {study.tracking.uri}  (run '{study.name}-ablation')")
    if outcome.interrupted:
        print(f"interrupted: continue with `python -m study ablate {args.study} --resume`")
        return 130
    return 0
