"""Atomic checkpoints: the best model, and the full run state for ``resume=...``.

Files are written to a temporary file in the target directory and renamed over the target
(``os.replace`` is atomic on POSIX), so a crash mid-write never leaves a truncated
checkpoint behind and never destroys the previous one.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from metarun.errors import one_line

State = TypeVar("State")


class CheckpointError(RuntimeError):
    """A checkpoint to resume from is missing or unreadable. The message is one line for the user."""


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from: Python's (learn2learn samples tasks with it), NumPy's, torch's."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model(path: Path, algorithm: nn.Module, iteration: int) -> None:
    atomic_save({"algorithm": algorithm.state_dict(), "iteration": iteration}, path)


def load_model(path: Path, algorithm: nn.Module) -> int:
    """Load the meta-parameters saved by :func:`save_model`; returns the iteration they are from."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    algorithm.load_state_dict(saved["algorithm"])
    return saved["iteration"]


def save_run(path: Path, algorithm: nn.Module, optimizer: torch.optim.Optimizer, state: Any) -> None:
    atomic_save(
        {
            "algorithm": algorithm.state_dict(),
            "optimizer": optimizer.state_dict(),
            "state": dataclasses.asdict(state),
            "rng": rng_state(),
        },
        path,
    )


def resolve(resume: str | Path) -> Path:
    """A checkpoint file, or a run directory holding ``checkpoints/last.pt``."""
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume at {path}; pass resume=<run dir> or resume=<file.pt>")
    return path


def load_run(path: Path, algorithm: nn.Module, optimizer: torch.optim.Optimizer, state_type: type[State]) -> State:
    """Restore model, optimizer and RNG states saved by :func:`save_run`; returns the run state."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        algorithm.load_state_dict(saved["algorithm"])
        optimizer.load_state_dict(saved["optimizer"])
    except (RuntimeError, KeyError, EOFError, OSError) as error:
        raise CheckpointError(f"cannot resume from {path}: {one_line(error)}") from None
    set_rng_state(saved["rng"])
    return state_type(**saved["state"])
