"""Start or join Ray from the driver: the same code on a laptop, a GPU box and a cluster."""

from __future__ import annotations

import os

import ray
from ray.exceptions import AuthenticationError

from trainables.errors import ConfigError


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
    if not address:
        ray.init(**kwargs)
        return
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"RAY_ADDRESS={address} is a dashboard (job submission) address: submit the study "
                          "with cluster/submit.sh, or set RAY_ADDRESS to the head's GCS address (host:6379)")
    try:
        ray.init(address=address, **kwargs)
    except (AuthenticationError, ConnectionError) as err:
        if not refused_token(err):
            raise
        raise ConfigError(f"the Ray cluster at {address} refused this driver's token: set RAY_AUTH_MODE=token and "
                          "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) as on the cluster's nodes") from None


def refused_token(err: BaseException | None) -> bool:
    """Whether ``err`` or its causes is Ray's token check (``ray.init`` wraps it in a ConnectionError)."""
    while err is not None:
        if isinstance(err, AuthenticationError) or "InvalidAuthToken" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False
