"""Atomic checkpoints: the best model, and the full run state for ``resume=...``; and the one
place that knows where a run keeps them::

    RUN_DIR/checkpoints/best.pt                     the best model on validation (weights, iteration)
    RUN_DIR/checkpoints/last.pt                     everything a resume needs (weights, optimizer, RNGs, ...)
    RUN_DIR/checkpoints/top/iteration_0000123.pt    with eval.top_k > 1: the top_k best on validation

A run tests ``best.pt``, or with ``eval.top_k > 1`` the ensemble of ``top/`` (:func:`tested`).

Files are written to a temporary file in the target directory and renamed over the target
(``os.replace`` is atomic on POSIX), so a crash mid-write never leaves a truncated
checkpoint behind and never destroys the previous one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from metarun.config import JOB_KEYS
from metarun.errors import CheckpointError, one_line

# ----------------------------------------------------------------------------------------------
# The layout of a run's checkpoints
# ----------------------------------------------------------------------------------------------

BEST, LAST, TOP = "best", "last", "top"
KINDS = (BEST, LAST, TOP)  # the saved models a run has: best.pt, last.pt, the ensemble of top/


def folder(run_dir: Path) -> Path:
    """The folder of a run's checkpoints, ``RUN_DIR/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def best_file(ckpt_dir: Path) -> Path:
    """The best model on validation, in the checkpoint folder ``ckpt_dir``."""
    return ckpt_dir / "best.pt"


def last_file(ckpt_dir: Path) -> Path:
    """The run state to resume from, in the checkpoint folder ``ckpt_dir``."""
    return ckpt_dir / "last.pt"


def top_file(ckpt_dir: Path, iteration: int) -> Path:
    """The kept top-k member saved at ``iteration``, in the checkpoint folder ``ckpt_dir``."""
    return ckpt_dir / "top" / f"iteration_{iteration:07d}.pt"


def tested(top_k: int) -> str:
    """What a run tests: with ``eval.top_k > 1`` the ensemble of its ``top_k`` best validation
    checkpoints (:data:`TOP`; Antoniou et al. 2019 test MAML++ so), else ``best.pt`` (:data:`BEST`)."""
    return TOP if top_k > 1 else BEST


def has_any(ckpt_dir: Path) -> bool:
    """Whether the checkpoint folder ``ckpt_dir`` holds a model: ``best.pt``, ``last.pt`` or a top-k member."""
    return best_file(ckpt_dir).is_file() or last_file(ckpt_dir).is_file() or any(ckpt_dir.glob("top/*.pt"))


def keep_top(ckpt_dir: Path, top: list[tuple[float, int]], score: float, iteration: int, algorithm: nn.Module,
             top_k: int, higher_is_better: bool, write: bool = True) -> list[tuple[float, int]]:
    """Keep the ``top_k`` best validation checkpoints in ``top/`` (for an ensemble test): save the
    model of ``iteration`` when its ``score`` ranks among them, delete the members it pushes out.

    Args:
        top: the ``(score, iteration)`` of the members kept so far, best first.
        higher_is_better: the direction of ``score``.
        write: save and delete the files (False: only rank them, on the ranks that do not write).

    Returns:
        The members kept now, best first.
    """
    ranked = sorted([*top, (score, iteration)], key=lambda e: e[0], reverse=higher_is_better)
    kept, dropped = ranked[:top_k], ranked[top_k:]
    if not write:
        return kept
    if (score, iteration) in kept:
        save_model(top_file(ckpt_dir, iteration), algorithm, iteration)
    for _, dropped_iteration in dropped:
        top_file(ckpt_dir, dropped_iteration).unlink(missing_ok=True)
    return kept


def top_members(run_dir: Path) -> list[Path]:
    """The run's kept top-k checkpoints, best first, as the run tested them: the order of
    ``results.json``'s ``tested_iterations``, else of ``last.pt``'s run state (an interrupted run),
    else by file name. The order matters: the ensemble sums the members' predictions in it.

    Raises:
        CheckpointError: the run kept none, or one of them is missing.
    """
    ckpt = folder(run_dir)
    iterations: list[int] | None = None
    if (run_dir / "results.json").is_file():
        try:
            iterations = list(json.loads((run_dir / "results.json").read_text())["tested_iterations"])
        except Exception:  # noqa: BLE001 - fall through to the other sources
            iterations = None
    if iterations is None and last_file(ckpt).is_file():
        try:
            iterations = [int(i) for _, i in safe_load(last_file(ckpt))["state"]["top"]]
        except Exception:  # noqa: BLE001
            iterations = None
    members = [top_file(ckpt, i) for i in iterations] if iterations else sorted(ckpt.glob("top/*.pt"))
    if not members or not (ckpt / "top").is_dir():
        raise CheckpointError(f"{run_dir} kept no top-k checkpoints (checkpoints/top/; a run keeps them with "
                              f"eval.top_k > 1); use --checkpoint best or last")
    for path in members:
        if not path.is_file():
            raise CheckpointError(f"{path}, a member of the run's top-k ensemble, is missing")
    return members


def model_files(run_dir: Path, which: str) -> list[Path]:
    """The files of the saved model ``which`` (:data:`KINDS`) of a run: ``[best.pt]``, ``[last.pt]``,
    or the top-k members in the order the run tested them (:func:`top_members`).

    Raises:
        CheckpointError: the file is not there (one line, naming the other choice).
    """
    if which == TOP:
        return top_members(run_dir)
    path = {BEST: best_file, LAST: last_file}[which](folder(run_dir))
    if not path.is_file():
        hint = {BEST: "the run has not validated yet: --checkpoint last scores checkpoints/last.pt",
                LAST: "--checkpoint best scores checkpoints/best.pt"}[which]
        raise CheckpointError(f"{path} not found; {hint}")
    return [path]


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) during the block takes effect when it ends, as KeyboardInterrupt. A KeyboardInterrupt
    inside ``torch.save`` makes its zip writer's exit raise ``RuntimeError: ... unexpected pos`` over it, so the
    run ended with a traceback instead of the one "interrupted" line. Only where Python's own handler is set
    (the main thread; not where SIGINT is ignored, as in a background job)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename, Ctrl-C deferred until the
    file is in place (:func:`ctrl_c_deferred`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with ctrl_c_deferred():
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


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files of writes that a killed process left in ``folder`` (SIGKILL skips
    :func:`atomic_save`'s clean-up); the checkpoints themselves are never touched."""
    if folder.is_dir():
        for path in folder.rglob(".*.pt.*"):
            path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from: Python's (learn2learn samples tasks with it), NumPy's, torch's,
    as tensors and plain lists, so that a checkpoint loads with ``weights_only=True``."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy().astype(np.uint32) if isinstance(keys, torch.Tensor) else keys  # older checkpoints: ndarray
    np.random.set_state((name, keys, pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def safe_load(path: Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, so a file named
    as a checkpoint can never run code. Checkpoints written before the RNG states were tensors
    hold NumPy's state as an array; reconstructing a NumPy array runs no code, so exactly those
    NumPy types are allowed too.

    Raises:
        CheckpointError: the file is unreadable, truncated, refused (it asks to run code) or not a
            metarun checkpoint; one line.
    """
    numpy_core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    numpy_array = [numpy_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(numpy_array):
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is one line for the user
        reason = one_line(error)
        if "Weights only load failed" in reason or "Unsupported global" in str(error):
            reason = "it is not plain tensors and containers: it would run code when unpickled, refused"
        raise CheckpointError(f"{path} is not a readable metarun checkpoint: {reason}") from None
    if not isinstance(saved, dict) or "algorithm" not in saved:
        raise CheckpointError(f"{path} is not a metarun checkpoint (no model weights in it)")
    return saved


def write(obj: Any, path: Path) -> None:
    """:func:`atomic_save`, with a failed write (a full disk, a read-only folder) as one line: the
    previous file at ``path`` is left as it was."""
    try:
        atomic_save(obj, path)
    except OSError as error:
        raise CheckpointError(f"cannot write {path}: {error.strerror or one_line(error)}; the previous {path.name}, "
                              f"if any, is intact") from None


def save_model(path: Path, algorithm: nn.Module, iteration: int) -> None:
    write({"algorithm": algorithm.state_dict(), "iteration": iteration}, path)


def load_model(path: Path, algorithm: nn.Module) -> int | None:
    """Load the meta-parameters saved by :func:`save_model` (or :func:`save_run`); returns the
    iteration they are from."""
    saved = safe_load(path)
    try:
        algorithm.load_state_dict(saved["algorithm"])
    except RuntimeError as error:
        raise CheckpointError(f"{path} holds another architecture: {one_line(error)}") from None
    return saved_iteration(saved)


def saved_iteration(saved: dict[str, Any]) -> int | None:
    """The iteration of a loaded checkpoint: a model's own, else its run state's (``last.pt``)."""
    state = saved.get("state")
    return saved.get("iteration", state.get("iteration") if isinstance(state, dict) else None)


def save_run(path: Path, algorithm: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler | None, state: Any, config: dict[str, Any],
             tracker_id: str | None) -> None:
    """Everything a resume needs: weights, optimizer and schedule states, the run state, every RNG,
    the run's config (unresolved, to compare with the resuming one) and the W&B run id."""
    write(
        {
            "algorithm": algorithm.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "state": dataclasses.asdict(state),
            "rng": rng_state(),
            "config": config,
            "wandb_id": tracker_id,
        },
        path,
    )


def resolve(resume: str | Path) -> Path:
    """A checkpoint file, or a run directory holding ``checkpoints/last.pt``."""
    path = Path(resume).expanduser()
    if path.is_dir():
        path = last_file(folder(path))
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume at {path}; pass resume=<run dir> or resume=<file.pt>")
    return path


# Settings a resumed run may change: how long it runs and how often it reports, how it is evaluated,
# where things are and how the job runs. Everything else must match the checkpoint's run.
RESUMABLE_CHANGES = ("iterations", "eval_every", "checkpoint_every", "eval.", "resume", "output_dir",
                     *JOB_KEYS)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def resolved_value(config: dict[str, Any], key: str) -> Any:
    """The value of dotted ``key`` in an unresolved run config, its interpolations resolved within it
    (``"<unresolvable>"`` when they cannot be)."""
    try:
        return OmegaConf.select(OmegaConf.create(config), key, throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - an interpolation of another process (an env var, a resolver)
        return "<unresolvable>"


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two unresolved run configs, other than
    :data:`RESUMABLE_CHANGES`. A key written differently that resolves to the same value (a literal
    784 in an older run, ``${metarun.product:...}`` today) is no difference."""
    old, new = flatten(saved), flatten(current)
    return [f"{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}"
            for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES)
            and not any(key == k.rstrip(".") for k in RESUMABLE_CHANGES)
            and (key not in old or key not in new or resolved_value(saved, key) != resolved_value(current, key))]


def read_run(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at ``path``, checked to be a run checkpoint of the same run as ``config``.

    Raises:
        CheckpointError: unreadable, not a run checkpoint (``best.pt`` holds weights only), or
            saved by a run whose settings differ in keys a resume may not change (named).
    """
    saved = safe_load(path)
    missing = [key for key in ("optimizer", "state", "rng") if key not in saved]
    if missing:
        raise CheckpointError(f"{path} holds model weights only (no {', '.join(missing)}), not a run to resume; "
                              f"pass the run directory or its checkpoints/last.pt")
    if saved.get("config") is not None:
        differences = config_differences(saved["config"], config)
        if differences:
            raise CheckpointError(f"cannot resume from {path}: the run differs in {'; '.join(differences)}; "
                                  f"resume with the same settings or start a new run")
    done, iterations = (saved.get("state") or {}).get("iteration"), config.get("iterations")
    if isinstance(done, int) and isinstance(iterations, int) and not isinstance(iterations, bool) \
            and done > iterations:
        raise CheckpointError(f"cannot resume from {path}: the checkpoint is already at iteration {done}, past "
                              f"iterations={iterations}; resume with iterations >= {done}")
    return saved


def restore_run(saved: dict[str, Any], path: Path, algorithm: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None) -> dict[str, Any]:
    """Restore model, optimizer, schedule and RNG states from :func:`read_run`'s checkpoint;
    returns the saved run state (a dict)."""
    if (scheduler is None) != (saved.get("scheduler") is None):
        raise CheckpointError(f"cannot resume from {path}: it was saved {'without' if scheduler is not None else 'with'}"
                              f" a scheduler; resume with the same scheduler option")
    try:
        algorithm.load_state_dict(saved["algorithm"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
    except Exception as error:  # noqa: BLE001 - a mismatch is one line for the user
        raise CheckpointError(f"cannot resume from {path}: {one_line(error)}") from None
    return saved["state"]


def carry_over(source_dir: Path, target_dir: Path, top_iterations: list[int]) -> None:
    """Copy the best models of a resumed run (``best.pt`` and the top-k members saved at
    ``top_iterations``) from its checkpoint folder into the new run's, unless it is the same
    folder: they belong to the run and can still win."""
    pairs = [(best_file(source_dir), best_file(target_dir)),
             *((top_file(source_dir, i), top_file(target_dir, i)) for i in top_iterations)]
    for source, target in pairs:
        if source.is_file() and source.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
