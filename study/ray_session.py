"""Start or join Ray from the driver: the same code on a laptop, a GPU box and a cluster."""

from __future__ import annotations

import os

import ray


def connect(address: str | None = None) -> None:
    """Join ``address`` / ``$RAY_ADDRESS`` if set, else start Ray in-process on this machine.

    Resource counts are never passed when joining: the cluster defines them (SPEC.md).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    # Keep worker logs out of the driver's terminal except errors: the CLI prints its own progress.
    kwargs = dict(log_to_driver=True, configure_logging=True, logging_level="WARNING")
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(**kwargs)
