"""What the commands (``metarun``, ``metarun-eval``, ``metarun-table``) share: where ``conf/`` is,
the config groups, and errors a user can fix as one line, ``metarun: error: ...``, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Iterator

from metarun.config import config_dir
from metarun.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    NonFiniteLossError,
    OutputExistsError,
    RankFailure,
)

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, NonFiniteLossError, OutputExistsError, RankFailure)

# conf/ sits at the top of the repository, next to src/ (metarun is installed editable).
CONFIG_DIR = str(config_dir())

# The config groups a command line may choose an option of (``algorithm=protonet``).
GROUPS = ("dataset", "algorithm", "backbone", "optimizer", "scheduler", "augment")


def user_error(error: BaseException) -> BaseException | None:
    """The user-fixable error behind ``error`` (Hydra wraps errors raised while instantiating)."""
    while error is not None:
        if isinstance(error, USER_ERRORS):
            return error
        error = error.__cause__ or error.__context__
    return None


def say(line: str) -> None:
    """``line`` and its newline on stderr in one write. ``print(..., file=sys.stderr)`` writes the text and the
    newline separately (Python's stderr is unbuffered), so two torchrun ranks failing at the same moment spliced
    their lines into one: ``metarun: error: rank 0: ...metarun: error: rank 1: ...``. One write of under 4 KiB to
    a pipe is atomic, so each rank's line stays whole."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def ending() -> None:
    """The command is ending with its one line: a SIGTERM from here on (torchrun stopping the other ranks
    once one has failed) must not cut that line off or replace it with a traceback."""
    with contextlib.suppress(ValueError):  # not the main thread: nothing to protect
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def fail(message: str) -> None:
    """End the command with ``metarun: error: <message>`` on stderr and exit status 2."""
    ending()
    say(f"metarun: error: {message}")
    sys.exit(2)


@contextlib.contextmanager
def user_errors(interrupted: str, label: str = "") -> Iterator[None]:
    """What a user can fix ends as one ``metarun: error:`` line and exit 2 (:func:`user_error`),
    Ctrl-C as ``metarun: <interrupted>`` and exit 130; anything else is a bug and keeps its traceback.
    ``label`` starts the line (``rank 1: `` in a distributed run)."""
    try:
        yield
    except KeyboardInterrupt:
        say(f"metarun: {label}{interrupted}")
        sys.exit(130)
    except Exception as error:
        ending()
        cause = user_error(error)
        if cause is None:
            raise
        fail(f"{label}{cause}")


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad argument as one line ``<label>: error: ... (<prog> --help)`` and exit
    status 2 instead of the usage block (``label``: how the command signs its errors, ``metarun``)."""

    def __init__(self, *args, label: str = "metarun", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.label = label

    def error(self, message: str) -> None:  # type: ignore[override]
        say(f"{self.label}: error: {message} ({self.prog} --help)")
        sys.exit(2)
