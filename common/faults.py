"""Fault injection for tests: kill this process with SIGKILL, or fail a write with a full disk, at an exact,
named point.

    DFKD_FAULT=<point>:<n>          kill on the n-th time (1-based) this process passes <point>
    DFKD_FAULT=enospc@<point>:<n>   raise OSError(ENOSPC) there instead (what a full disk gives a write)

Points (a name may itself contain ':'; the count is what follows the last one):
  generator-step            synth: after a generator optimisation step, before its checkpoint
  shard-sample              synth: after a sample is added to a shard being written
  shard-done                synth: after a shard is renamed to its final name, before the manifest lists it
  shard-listed              synth: after the manifest lists a new shard (between shards)
  train-step                distill: after an optimiser step (mid-epoch)
  epoch-saved               distill: after an epoch's checkpoint is renamed, before metrics.csv is written
  half-written:<file>       any atomic write through `write_bytes_atomic`: half the bytes are in the temp file
  commit:<file>             any atomic write: the temp file is complete and fsynced, not yet renamed
                            (`distill export`'s files included)

Unset (the normal case) this costs one dictionary lookup per call.
"""
from __future__ import annotations

import errno
import os
import signal

FAULT_ENV = "DFKD_FAULT"
ACTIONS = ("kill", "enospc")
_passes: dict[str, int] = {}


def parse_fault(spec: str) -> tuple[str, int, str]:
    """'[action@]point:n' -> (point, n, action); ValueError for anything else."""
    action, at, rest = spec.partition("@")
    if not at:
        action, rest = "kill", spec
    point, _, count = rest.rpartition(":")
    if action not in ACTIONS or not point or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{FAULT_ENV} must look like [enospc@]<point>:<n> with n >= 1, got {spec!r}")
    return point, int(count), action


def fault_point(name: str) -> None:
    """On the configured pass of point `name`: kill this process (SIGKILL: no cleanup, no flush), or raise
    the OSError of a full disk."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, count, action = parse_fault(spec)
    if point != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == count:
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.kill(os.getpid(), signal.SIGKILL)
