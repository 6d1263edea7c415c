"""One run on many devices: the meta-batch split across the ranks of a torch.distributed group.

torchrun (``torchrun --nproc_per_node=N -m metarun ...``) or Slurm (``hydra/launcher=slurm
hydra.launcher.tasks_per_node=N``, every task of a job one rank; submitit's
``TorchDistributedEnvironment`` reads Slurm's variables) starts the processes; this module only
joins them (``init_process_group``: gloo on CPU, nccl on CUDA, ``cuda:LOCAL_RANK`` per rank) and
lends the collectives the rest of metarun needs, through :class:`Ranks`:

- :meth:`Ranks.share`: the contiguous slice of a meta-batch (or of the fixed evaluation tasks) a
  rank runs; ``B`` tasks on ``W`` ranks give rank ``r`` tasks ``[rB/W, (r+1)B/W)``, uneven when
  ``W`` does not divide ``B``.
- :meth:`Ranks.weighted_sum_`: ``sum_r w_r x_r`` in place, ``w_r`` the share of the meta-batch
  rank ``r`` ran: the meta-gradient, the metrics and Reptile's ``phi`` are means over the whole
  meta-batch (:class:`metarun.algorithms.base.MetaUpdate` calls it).
- :meth:`Ranks.merge_buffers`: BatchNorm running statistics as if the ranks' tasks had run one
  after the other in one process.
- :meth:`Ranks.exchange`: text from every rank, in rank order (evaluation results are gathered
  with it, as JSON: nothing is unpickled).

A rank that dies makes the others' next collective fail (gloo and nccl see the closed
connection; a hung rank is bounded by :data:`TIMEOUT_S`), and torchrun stops the survivors with
SIGTERM: either way each survivor raises :class:`RankFailure`, one line naming the rank that
stopped. A run without torchrun or Slurm tasks is :data:`SINGLE`: no process group, and every
method above returns at once.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from metarun.errors import ConfigError, RankFailure, one_line

log = logging.getLogger(__name__)
_WARNED_CARRIED = False  # the warning of merge_buffers, once per process

# Seconds a collective waits for a rank that neither answers nor closes its connection (a hung
# process); a rank that dies closes its connections and is noticed at once. METARUN_DIST_TIMEOUT_S
# changes it (the group is joined before the config is composed).
TIMEOUT_S = 300
# How long a rank whose collective failed waits for the peer that caused it to show as gone. The kernel closes a
# killed process's sockets before the process becomes a zombie, so the survivor's "connection reset" can come
# while the peer still looks alive; under load that window reached the stopped() check (a CI run's "lost contact
# with another rank" where rank 1 had been killed).
GONE_GRACE_S = 3.0


@dataclass(frozen=True)
class Peer:
    """Where a rank runs: its host and process id (to name a rank that stopped)."""

    host: str
    pid: int


@dataclass
class Ranks:
    """This process's place in the run's process group (world size 1: no group).

    Attributes:
        rank: this process's rank, 0 .. world_size - 1; rank 0 alone writes.
        world_size: processes in the run.
        local_rank: its rank on its node (its GPU: ``cuda:local_rank``).
        peers: every rank's host and pid, in rank order (empty without a group).
        devices: every rank's device, in rank order, once the build chose them.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    peers: tuple[Peer, ...] = ()
    devices: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes files, W&B and the console (rank 0)."""
        return self.rank == 0

    @property
    def label(self) -> str:
        """What starts this rank's error lines (``rank 1: ``; nothing for one process)."""
        return f"rank {self.rank}: " if self.active else ""

    @property
    def backend(self) -> str | None:
        """The backend of the collectives on this run's device: nccl on CUDA, gloo on CPU."""
        if not self.active:
            return None
        return "nccl" if self.devices and self.devices[0].startswith("cuda") else "gloo"

    def record(self) -> dict[str, Any]:
        """What results.json, the log and the W&B config record of the process group."""
        return {"world_size": self.world_size, "backend": self.backend, "devices": list(self.devices)}

    # -- splitting ---------------------------------------------------------------------------

    def share(self, count: int) -> slice:
        """This rank's contiguous part of ``count`` items: ``[r * count // W, (r + 1) * count // W)``."""
        return slice(self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size)

    # -- collectives -------------------------------------------------------------------------

    def weighted_sum_(self, tensors: Sequence[torch.Tensor], weight: float) -> None:
        """``t <- sum_r w_r t_r`` in place for every tensor (``w_r``: ``weight`` on rank ``r``), in one
        all-reduce. Every rank passes tensors of the same shapes, dtypes and device, in the same order."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1).double() for t in tensors]) * weight  # float64: one rounding, at the end
        self._call(dist.all_reduce, flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def reduce_gradients(self, parameters: Sequence[nn.Parameter], weight: float) -> None:
        """Each ``.grad`` becomes the weighted sum over ranks (:meth:`weighted_sum_`). A parameter
        without a gradient on some ranks counts as zero there; one without a gradient on every rank
        keeps ``None``, so the optimizer skips it as a one-process run would."""
        if not self.active:
            return
        parameters = list(parameters)
        if not parameters:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float64,
                               device=parameters[0].device)
        self.weighted_sum_([*grads, present], weight)  # present stays 0 exactly where no rank had a gradient
        for p, grad, anywhere in zip(parameters, grads, present.tolist(), strict=True):
            p.grad = grad if anywhere else None

    def exchange(self, text: str) -> list[str]:
        """Every rank's ``text``, in rank order."""
        if not self.active:
            return [text]
        device = torch.device(self.devices[self.rank]) if self.backend == "nccl" else torch.device("cpu")
        data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world_size)]
        self._call(dist.all_gather, sizes, torch.tensor([data.numel()], device=device))
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[:data.numel()] = data
        gathered = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(self.world_size)]
        self._call(dist.all_gather, gathered, padded)
        return [bytes(g[:int(s)].tolist()).decode() for g, s in zip(gathered, sizes, strict=True)]

    def barrier(self) -> None:
        """Wait for every rank (rank 0 has written what the others read next)."""
        if self.active:
            self._call(dist.barrier)

    def check_same(self, what: str, text: str) -> None:
        """Raise ConfigError on every rank when ``text`` (the resolved config) differs between ranks."""
        digests = self.exchange(hashlib.sha256(text.encode()).hexdigest())
        differing = [r for r, d in enumerate(digests) if d != digests[0]]
        if differing:
            raise ConfigError(f"the ranks' {what} differ (rank {differing[0]}'s is not rank 0's): launch every rank "
                              f"with the same arguments, config files and environment")

    # -- BatchNorm running statistics ----------------------------------------------------------

    def merge_buffers(self, module: nn.Module, before: dict[str, torch.Tensor]) -> None:
        """``module``'s buffers after a meta-step split across ranks, as one process running every
        rank's tasks in rank order would leave them.

        BatchNorm running statistics exactly: each training pass folds ``r <- (1 - m) r + m s``, and
        ``s`` (the batch's statistics) does not depend on ``r``, so a rank that made ``k`` passes from
        ``r0`` ends at ``R = (1 - m)^k r0 + C``. Gathering every rank's ``R`` and ``k``, the sequential
        result is ``G <- (1 - m)^k G + C`` over the ranks in order, from ``G = r0``. ``k`` is the change
        of the layer's pass counter (``num_batches_tracked``, or per statistics row when the layer keeps
        one: ``row_passes``); ``before`` holds the buffers as :func:`buffer_state` read them.

        Any other buffer (a state carried from task to task, such as Reptile's inner Adam moments) cannot
        be split: every rank carried it through its own tasks from the same start, and the last rank's,
        which ran the meta-batch's last tasks, is kept everywhere. Such a run is close to, not exactly,
        the one-process run; a warning says so once.
        """
        if not self.active or not before:
            return
        layers = running_layers(module)
        after = buffer_state(module)
        statistics = [name for name in after if name in running_names(layers)]
        others = [name for name in after if name not in statistics]
        with torch.no_grad():
            if statistics:
                self._merge_statistics(layers, before, {name: after[name] for name in statistics})
            if others:
                changed = torch.tensor([float(any(not torch.equal(after[n], before[n]) for n in others))],
                                       device=after[others[0]].device)
                self._call(dist.all_reduce, changed)
                if changed.item():
                    global _WARNED_CARRIED
                    if not _WARNED_CARRIED:
                        log.warning("the meta-step changed buffers that are not BatchNorm statistics (%s): a state "
                                    "carried from task to task cannot be split across ranks; the last rank's is "
                                    "kept, so this run is close to, not exactly, the one-process run",
                                    ", ".join(others[:3]) + (", ..." if len(others) > 3 else ""))
                        _WARNED_CARRIED = True
                    buffers = dict(module.named_buffers())
                    flat = torch.cat([buffers[n].reshape(-1).double() for n in others])
                    self._call(dist.broadcast, flat, self.world_size - 1)
                    offset = 0
                    for n in others:
                        buffers[n].copy_(flat[offset:offset + buffers[n].numel()].view_as(buffers[n]))
                        offset += buffers[n].numel()

    def _merge_statistics(self, layers: list[tuple[str, nn.modules.batchnorm._BatchNorm]],
                          before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
        local = torch.cat([after[name].reshape(-1).double() for name in after])
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        self._call(dist.all_gather, gathered, local)
        per_rank = [dict(zip(after, rank_flat.split([after[n].numel() for n in after]), strict=True))
                    for rank_flat in gathered]
        for prefix, bn in layers:
            counter = f"{prefix}row_passes" if f"{prefix}row_passes" in after else f"{prefix}num_batches_tracked"
            rows = after[counter].numel()
            counts = [values[counter] - before[counter].reshape(-1).double() for values in per_rank]  # [rows] each
            for name in ("running_mean", "running_var"):
                key = f"{prefix}{name}"
                start = before[key].double().reshape(rows, -1)
                merged = start.clone()
                for values, count in zip(per_rank, counts, strict=True):
                    decay = (1.0 - bn.momentum) ** count.unsqueeze(1)  # [rows, 1]
                    merged = decay * merged + (values[key].reshape(rows, -1) - decay * start)
                getattr(bn, name).copy_(merged.reshape(getattr(bn, name).shape).to(getattr(bn, name).dtype))
            total = sum(counts) + before[counter].reshape(-1).double()
            if f"{prefix}row_passes" in after:
                bn.row_passes.copy_(total.to(bn.row_passes.dtype))
                total = sum(c.sum() for c in counts) + before[f"{prefix}num_batches_tracked"].double()
            bn.num_batches_tracked.copy_(total.reshape(()).to(bn.num_batches_tracked.dtype))

    # -- failures ----------------------------------------------------------------------------

    def _call(self, collective: Any, *args: Any) -> Any:
        try:
            return collective(*args)
        except RankFailure:
            raise
        except Exception as error:  # noqa: BLE001 - any backend error here means a rank is gone or hung
            raise RankFailure(self.stopped(error, grace=GONE_GRACE_S)) from None

    def stopped(self, error: BaseException | str, grace: float = 0.0) -> str:
        """One line: which rank stopped (a peer on this host whose process is gone, waiting up to ``grace``
        seconds for one to be seen gone), and what to do. A failed collective waits (GONE_GRACE_S); the
        launcher's SIGTERM does not, as the launcher has already reaped the rank that ended."""
        local = [r for r, peer in enumerate(self.peers) if r != self.rank and peer.host == socket.gethostname()]
        deadline = time.monotonic() + grace
        while True:
            gone = [r for r in local if not process_alive(self.peers[r].pid)]
            if gone or not local or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        cause = one_line(error) if isinstance(error, BaseException) else error
        who = (f"rank {', '.join(map(str, gone))} stopped (process {', '.join(str(self.peers[r].pid) for r in gone)})"
               if gone else f"lost contact with another rank ({cause[:160]})")
        return f"{who}; every rank stops, and the last complete checkpoint stays"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115, PTH123 - one read
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def running_layers(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorm layers of ``module`` that keep running statistics, with their state-dict prefixes.

    Raises:
        ConfigError: one with cumulative averaging (``momentum=None``), which cannot be merged.
    """
    layers = []
    for name, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats \
                and layer.running_mean is not None:
            if layer.momentum is None:
                raise ConfigError(f"BatchNorm {name} averages its running statistics cumulatively (momentum=None); "
                                  f"several ranks need a momentum")
            layers.append((f"{name}." if name else "", layer))
    return layers


def running_names(layers: list[tuple[str, nn.modules.batchnorm._BatchNorm]]) -> set[str]:
    """The buffer names of the running statistics and pass counters of ``layers``."""
    return {f"{prefix}{name}" for prefix, _ in layers
            for name in ("running_mean", "running_var", "num_batches_tracked", "row_passes")}


def buffer_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of ``module``'s buffers, by name (what :meth:`Ranks.merge_buffers` starts from)."""
    return {name: buffer.detach().clone() for name, buffer in module.named_buffers()}


# -- joining the group ---------------------------------------------------------------------------

def from_environment() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's variables, or from a Slurm/submitit job
    with several tasks (whose helper then exports torchrun's variables); None for one process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if not any(name.startswith(("SLURM_", "SUBMITIT_")) for name in os.environ):
        return None  # no job scheduler: one process, without importing submitit at every start
    try:
        import submitit

        environment = submitit.JobEnvironment()
        tasks = environment.num_tasks
    except Exception:  # noqa: BLE001 - not inside a Slurm or submitit job
        return None
    if tasks <= 1:
        return None
    exported = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return exported.rank, exported.world_size, exported.local_rank


_JOINED: Ranks | None = None


def join() -> Ranks:
    """This process's :class:`Ranks`: the process group is joined on the first call (gloo, with
    nccl for CUDA tensors where there is a GPU), every rank learns the others' hosts and pids, and
    SIGTERM (torchrun stopping the survivors of a failed rank) becomes :class:`RankFailure`."""
    global _JOINED
    if _JOINED is not None:
        return _JOINED
    found = from_environment()
    if found is None or found[1] == 1:
        _JOINED = Ranks()
        return _JOINED
    rank, world_size, local_rank = found
    timeout = datetime.timedelta(seconds=float(os.environ.get("METARUN_DIST_TIMEOUT_S", TIMEOUT_S)))
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
    except Exception as error:  # noqa: BLE001 - a rendezvous that cannot complete
        raise RankFailure(f"cannot join the other {world_size - 1} ranks: {one_line(error)}") from None
    ranks = Ranks(rank=rank, world_size=world_size, local_rank=local_rank)
    peers = [json.loads(text) for text in ranks.exchange(json.dumps([socket.gethostname(), os.getpid()]))]
    ranks = Ranks(rank=rank, world_size=world_size, local_rank=local_rank,
                  peers=tuple(Peer(host, pid) for host, pid in peers))

    def stop(signum: int, frame: Any) -> None:
        raise RankFailure(ranks.stopped("stopped by the launcher"))

    signal.signal(signal.SIGTERM, stop)
    _JOINED = ranks
    return ranks


def leave() -> None:
    """Leave the process group (at the end of a run)."""
    global _JOINED
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _JOINED = None


def device_for(name: str, ranks: Ranks) -> str:
    """The device a rank runs on: ``name`` (``cpu``, ``cuda``, ``auto``) with CUDA meaning
    ``cuda:LOCAL_RANK``, one GPU per rank.

    Raises:
        ConfigError: a GPU index chosen by hand with several ranks, or fewer GPUs than local ranks.
    """
    if not ranks.active:
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name != "cuda":
        raise ConfigError(f"device={name} with {ranks.world_size} ranks: use device=cuda (each rank takes "
                          f"cuda:LOCAL_RANK) or device=cpu")
    gpus = torch.cuda.device_count()
    if ranks.local_rank >= gpus:
        raise ConfigError(f"device=cuda but this node has {gpus} GPU(s) for local rank {ranks.local_rank}: launch "
                          f"at most {gpus} processes per node (torchrun --nproc_per_node={max(gpus, 1)}), or use "
                          f"device=cpu")
    return f"cuda:{ranks.local_rank}"


def check_world(ranks: Ranks, meta_batch_size: int, eval_tasks: Sequence[int]) -> None:
    """Raise ConfigError when some rank would have no task of a meta-batch or of an evaluation."""
    if not ranks.active:
        return
    if meta_batch_size < ranks.world_size:
        raise ConfigError(f"{ranks.world_size} ranks but meta_batch_size={meta_batch_size}: every rank needs a task; "
                          f"use meta_batch_size >= {ranks.world_size} or fewer ranks")
    fewest = min(eval_tasks)
    if fewest < ranks.world_size:
        raise ConfigError(f"{ranks.world_size} ranks but only {fewest} evaluation tasks: raise eval.tasks and "
                          f"eval.val_tasks to >= {ranks.world_size}")




SINGLE = Ranks()  # one process: no group
