"""Helpers for errors a user can fix, which metarun reports as one line."""

from __future__ import annotations


def one_line(error: BaseException) -> str:
    """The first line of an error's message (or its type), for one-line user messages."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
