"""One module per CLI command: ``add_parser(subparsers)`` registers it, ``run(args) -> int`` runs it."""
