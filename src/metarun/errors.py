"""Helpers for errors a user can fix, which metarun reports as one line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that cannot work. The message is one line for the user."""


class DatasetError(RuntimeError):
    """Data is missing, corrupt or does not fit the request. The message is one line for the user."""


class NonFiniteLossError(FloatingPointError):
    """The meta-training loss became NaN or infinite."""


class CheckpointError(RuntimeError):
    """A checkpoint to resume from or to score is missing or unreadable. The message is one line for the user."""


class OutputExistsError(FileExistsError):
    """The output directory already holds a finished run."""


class RankFailure(RuntimeError):
    """Another rank of a distributed run stopped (died, was killed, or failed). The message is one
    line naming it."""


def one_line(error: BaseException) -> str:
    """The first line of an error's message (or its type), for one-line user messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
