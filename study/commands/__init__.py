"""One module per CLI command: ``add_parser(subparsers)`` registers it, ``run(args) -> int`` runs it."""


def add_overrides(parser) -> None:
    """``--set section.key=value`` (repeatable), type-checked when the study file is validated."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a study-file value, e.g. --set train.epochs=2 (repeatable)")


def add_address(parser) -> None:
    parser.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
