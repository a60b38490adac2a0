"""Errors the worker side raises for bad input; the CLI turns them into one line and exit code 2."""


class ITMError(Exception):
    """Base class: the message is a complete, single-line explanation (what, where, how to fix)."""


class DataError(ITMError):
    """A dataset on disk is missing or malformed."""


class ConfigError(ITMError):
    """A configuration value is invalid or names something that does not exist."""


class NonFiniteLossError(ITMError):
    """Training produced a NaN or infinite loss; the run (trial) cannot continue."""
