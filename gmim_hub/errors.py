"""Exceptions that carry a one-line, actionable message.

Every error a user can cause (bad config, bad file, bad request) is raised as a subclass of `GMIMError`, so the CLI
can print it on one line and exit non-zero without a traceback. They subclass `ValueError` (or `FileNotFoundError`)
so that callers who catch the built-in types keep working.
"""

from __future__ import annotations


class GMIMError(ValueError):
    """Base class: the message says what is wrong and how to fix it."""


class ConfigError(GMIMError):
    """An invalid configuration value or config.json."""


class WeightsError(GMIMError):
    """Weights that are missing, corrupt, of the wrong layout or unsafe to load."""


class InputError(GMIMError):
    """An input volume or file that cannot be used (wrong shape, NaNs, unreadable)."""


class ServingError(GMIMError):
    """A problem talking to, or starting, an inference server."""


class NonFiniteLossError(GMIMError):
    """The loss became NaN or inf: the run stops at once, leaving the last good checkpoint in place."""


class OutputError(GMIMError):
    """An output that cannot be written: it would replace an input, its folder is not writable, the disk is full."""
