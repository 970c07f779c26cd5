"""The checkpoint of a run: its fingerprint (what a resume must agree on), the RNG states, writing it
atomically, loading it (refusing another run's) and restoring a run from it."""
from __future__ import annotations

from pathlib import Path

import torch

from dfkd.common.errors import UserError
from dfkd.common.fileio import load_torch_safely, save_torch_atomic
from dfkd.common.shards import Manifest

from .config import ORDER_CHANGES, changed_settings
from .nets import Models
from .run_folder import CHECKPOINT_FILE


def run_fingerprint(settings: dict, manifest: Manifest, teacher_sha256: str, world_size: int = 1) -> dict:
    """What a checkpoint must agree on to be resumed: the run's hashed settings (config.run_settings), shard
    checksums, teacher weights and the number of processes (it sets the data split and the steps per epoch)."""
    return {"settings": settings, "shards": [s.sha256 for s in manifest.shards], "teacher_sha256": teacher_sha256,
            "world_size": world_size}


def rng_states() -> dict:
    """This process's RNG states (CPU, and its CUDA device's)."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def save_checkpoint(path: Path, models: Models, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, history: list[dict],
                    settings: dict, fingerprint: dict, step_log: list[dict] | None = None,
                    rank_rngs: list[dict] | None = None, val_set: dict | None = None) -> None:
    """Everything needed to continue after `epoch` completed epochs, written atomically (temp, fsync,
    rename: a kill or a full disk leaves the previous checkpoint in place). `settings`: the run's
    (config.run_settings); `rank_rngs`: every rank's
    `rng_states()` (in a distributed run); `val_set`: the held-out split the epochs were measured on
    (`ValSet.identity`)."""
    state = {
        "epoch": epoch, "student": models.student.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "history": history, "config": settings,
        "fingerprint": fingerprint, "step_log": step_log or [],
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    if rank_rngs is not None:
        state["rng"]["ranks"] = rank_rngs
    if val_set is not None:
        state["val_set"] = val_set
    if models.ema is not None:
        state["ema"] = models.ema.state_dict()
    if models.scaler.is_enabled():
        state["scaler"] = models.scaler.state_dict()
    save_torch_atomic(path, state)


def load_checkpoint(path: Path, fingerprint: dict) -> dict:
    """A checkpoint of this very run (same settings, shards and teacher), else UserError."""
    fix = "delete the run folder (or choose another --out) to start again"
    state = load_torch_safely(path, fix)
    try:
        saved = state["fingerprint"]
        saved_settings, saved_shards, saved_teacher = dict(saved["settings"]), saved["shards"], saved["teacher_sha256"]
        int(state["epoch"]), list(state["history"]), state["student"], state["rng"]["torch"]  # noqa: B018
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} is not a `distill train` checkpoint; {fix}") from None
    changed = changed_settings(saved_settings, fingerprint["settings"])
    order = [c.name for c in changed if c.name in ORDER_CHANGES]
    if changed:
        why = (f" ({', '.join('--' + k.replace('_', '-') for k in order)} changes the sample order or augmentation "
               "draws, so the run would not continue as it started)") if order else ""
        raise UserError(f"{path} belongs to a run with other settings ({', '.join(map(str, changed))}){why}: resume with the "
                        "same options or choose another --out")
    if saved_shards != fingerprint["shards"] or saved_teacher != fingerprint["teacher_sha256"]:
        raise UserError(f"{path} was trained on other shards (or by another teacher) than the --shards given now "
                        "(or another set of them was skipped): pass the original --shards, restore the shards it "
                        "used, or choose another --out")
    saved_world, world = saved.get("world_size", 1), fingerprint["world_size"]
    if saved_world != world:
        raise UserError(f"{path} belongs to a run of {saved_world} process(es), this is {world}: resume with "
                        f"{saved_world} in all (torchrun --nnodes x --nproc_per_node), or choose another --out")
    return state


def restore(state: dict, models: Models, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, path: Path | str = CHECKPOINT_FILE,
            rank: int = 0) -> None:
    try:
        models.student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if models.ema is not None:
            models.ema.load_state_dict(state["ema"])
        if "scaler" in state:
            models.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]["ranks"][rank] if "ranks" in state["rng"] else {"torch": state["rng"]["torch"]}
        torch.set_rng_state(rng["torch"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not fit this student and optimiser ({type(e).__name__}); delete the run "
                        "folder (or choose another --out) to start again") from None
    if "ranks" in state["rng"]:
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    elif state["rng"].get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])

