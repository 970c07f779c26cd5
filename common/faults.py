"""Fault injection for tests: kill this process with SIGKILL at an exact, named point.

    DFKD_FAULT=<point>:<n>      kill on the n-th time (1-based) this process passes <point>

Points (a name may itself contain ':'; the count is what follows the last one):
  generator-step            synth: after a generator optimisation step, before its checkpoint
  shard-sample              synth: after a sample is added to a shard being written
  shard-done                synth: after a shard is renamed to its final name, before the manifest lists it
  shard-listed              synth: after the manifest lists a new shard (between shards)
  train-step                distill: after an optimiser step (mid-epoch)
  epoch-saved               distill: after an epoch's checkpoint is renamed, before metrics.csv is written
  half-written:<file>       any atomic write through `write_bytes_atomic`: half the bytes are in the temp file
  commit:<file>             any atomic write: the temp file is complete and fsynced, not yet renamed

Unset (the normal case) this costs one dictionary lookup per call.
"""
from __future__ import annotations

import os
import signal

FAULT_ENV = "DFKD_FAULT"
_passes: dict[str, int] = {}


def parse_fault(spec: str) -> tuple[str, int]:
    """'point:n' -> (point, n); ValueError for anything else."""
    point, _, count = spec.rpartition(":")
    if not point or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{FAULT_ENV} must look like <point>:<n> with n >= 1, got {spec!r}")
    return point, int(count)


def fault_point(name: str) -> None:
    """Kill this process (SIGKILL: no cleanup, no flush) on the configured pass of point `name`."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, count = parse_fault(spec)
    if point != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == count:
        os.kill(os.getpid(), signal.SIGKILL)
