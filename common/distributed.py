"""torchrun support shared by both stages: who am I, start/stop the process group, small collectives.

Under `torchrun` (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
with WORLD_SIZE > 1 the stages run as one job of WORLD_SIZE processes; without those variables (or
with WORLD_SIZE 1) everything here is a no-op and a plain process is rank 0 of 1.

    with distributed.process_group("gloo") as dist:   # nccl for CUDA training
        if dist.is_main: ...
        distributed.barrier()
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as td

from .errors import UserError

# Ranks wait for each other at barriers; stage one's ranks wait while rank 0 fits a method, which
# can take hours, so its barriers get a long limit. Override with DFKD_DIST_TIMEOUT_MIN.
DEFAULT_TIMEOUT_MIN = 30
# what gloo and NCCL say when the process at the other end of a collective is gone
_PEER_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|remote worker|Broken pipe|ncclRemoteError|"
                        r"NCCL communicator was aborted|DistNetworkError|Socket Timeout", re.IGNORECASE)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def info() -> DistInfo:
    """This process's place in the job, from torchrun's environment variables (rank 0 of 1 without them)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise UserError(f"RANK {rank} is outside 0..{world - 1} (WORLD_SIZE {world}): launch with torchrun")
    return DistInfo(rank, world, local_rank, local_world)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """torch CPU threads per process: this node's cores shared evenly by its ranks (at least 1).
    torch's own default (all cores in every rank) oversubscribes a node N-fold under torchrun."""
    return max(1, usable_cores() // max(1, info().local_world_size))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def device_for(requested: torch.device) -> torch.device:
    """A CUDA device without an index means this rank's GPU (cuda:LOCAL_RANK); anything else as given."""
    if requested.type == "cuda" and requested.index is None:
        return torch.device("cuda", info().local_rank % max(1, torch.cuda.device_count()))
    return requested


@contextlib.contextmanager
def process_group(backend: str, timeout_min: float | None = None) -> Iterator[DistInfo]:
    """Join the job's process group for the duration of the block (when WORLD_SIZE > 1); leave it after.
    A group that is already initialised (by a caller) is used as is and left alone."""
    me = info()
    if not me.enabled or td.is_initialized():
        yield me
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise UserError(f"WORLD_SIZE is {me.world_size} but {name} is not set: start the job with torchrun "
                            "(e.g. torchrun --nproc_per_node=2 -m dfkd.distill train ...)")
    minutes = float(os.environ.get("DFKD_DIST_TIMEOUT_MIN", timeout_min or DEFAULT_TIMEOUT_MIN))
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    timeout = datetime.timedelta(minutes=minutes)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None:
        # torchrun's elastic agent keeps one store for every restart of the job: the keys the killed attempt's
        # ranks wrote (their addresses) are still there and a restarted rank may connect to a dead one. Each
        # attempt gets keys of its own.
        store, rank, world = next(td.rendezvous("env://", timeout=timeout))
        kwargs.update(store=td.PrefixStore(f"dfkd/attempt-{restart}", store), rank=rank, world_size=world)
    td.init_process_group(backend, timeout=timeout, **kwargs)
    try:
        yield me
    except RuntimeError as e:
        if not _PEER_LOST.search(str(e)):
            raise
        # another rank stopped (its own one-line error is above): one line here too, not a traceback
        raise UserError(f"rank {me.rank} stopped: another process of this job ended first (its error is above; "
                        "torchrun names it as the root cause)") from None
    finally:
        td.destroy_process_group()


def barrier() -> None:
    if td.is_initialized():
        td.barrier()


def all_reduce_mean(value: float, device: torch.device) -> float:
    """The mean of a float over all ranks (the value itself in a single process)."""
    if not td.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    td.all_reduce(t)
    return t.item() / td.get_world_size()


def all_gather_object(obj: Any) -> list:
    """Every rank's `obj` (small, trusted: our own ranks), in rank order; [obj] in a single process."""
    if not td.is_initialized():
        return [obj]
    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (small, trusted: our own ranks); `obj` itself in a single process."""
    if not td.is_initialized():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]
