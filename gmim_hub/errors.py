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


def one_line(error: BaseException, *, last: bool = False, empty: str | None = None) -> str:
    """One line of a library's exception message, to quote inside ours (library messages span lines; ours must not):
    the first non-empty line, or the last with `last=True` (SimpleITK puts the description after its call trace).
    A message with no text gives `empty`, by default the exception's type name."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__ if empty is None else empty
    return lines[-1] if last else lines[0]
