"""The run folder: its files, the checks before it is touched (a previous run is continued only with
--resume, the start of another run is refused), its creation, the CSV logs written into it and the
checkpoint (its fingerprint, what a resume must agree on; the RNG states; writing it atomically; loading it,
refusing another run's; restoring a run from it)."""
from __future__ import annotations

import contextlib
import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from dfkd.common.errors import UserError
from dfkd.common.fileio import atomic_open, load_torch_safely, save_torch_atomic
from dfkd.common.remote import is_remote
from dfkd.common.shards import MANIFEST_NAME, Manifest

from .config import ORDER_CHANGES, changed_settings
from .nets import Models
from .validation import VAL_COLUMNS

CONFIG_FILE, CHECKPOINT_FILE, METRICS_FILE, STUDENT_FILE = "config.json", "checkpoint.pt", "metrics.csv", "student.pt"
STEPS_FILE, EMA_FILE = "steps.csv", "student_ema.pt"
METRICS_COLUMNS = ("epoch", "step", "lr", "train_loss", "eval_top1", "seconds", "images_per_s")
EMA_COLUMN = "ema_top1"  # appended with ema_decay > 0
STEPS_COLUMNS = ("epoch", "step", "lr", "train_loss")  # then one loss_<name> column per term of the loss
TERM_PREFIX = "loss_"


def check_out(out: Path, shards: str, resume: bool, settings: dict) -> Path:
    """The run folder `out` for a run on `shards` with `settings` (config.run_settings), checked without
    touching it: refuse to start over a previous run unless resuming it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the run")
    if not is_remote(shards) and out.resolve() == Path(shards).resolve():
        raise UserError(f"--out {out} is the shards folder; give the run its own folder")
    if not resume and (out / CHECKPOINT_FILE).exists():
        raise UserError(f"{out} already holds a run: pass --resume to continue it or choose another --out")
    check_started_run(out, settings)
    return out


def check_run_folder(run: Path, command: str) -> Path:
    """A `distill train` run folder to read (`distill export`, `distill report`); UserError saying what
    `run` is instead: missing, a file, a shards folder."""
    fix = "give the --out folder of a `distill train` run"
    if not run.exists():
        raise UserError(f"run folder {run} does not exist; {fix}")
    if not run.is_dir():
        raise UserError(f"{run} is a file, not a run folder; {fix}")
    if (run / MANIFEST_NAME).is_file() and not (run / CONFIG_FILE).is_file():
        raise UserError(f"{run} is a shards folder (written by `synth generate`), not a run folder: distill a student "
                        f"from it (`distill train --shards {run} --out RUN ...`), then `distill {command} RUN`")
    return run


@dataclass(frozen=True)
class FolderBefore:
    """What existed of the run folder before this run: the first folder of its path that did not exist
    (None: the run folder did), and the names in the run folder."""

    created: Path | None
    names: frozenset

    @classmethod
    def of(cls, out: Path) -> "FolderBefore":
        if out.is_dir():
            return cls(None, frozenset(p.name for p in out.iterdir()))
        created = out.absolute()
        while not created.parent.exists():
            created = created.parent
        return cls(created, frozenset())


def remove_unstarted(out: Path, before: FolderBefore) -> None:
    """After a run failed before its first checkpoint (a damaged shard found while reading, a diverged
    first epoch): remove what it created (the folder if it made it, else the files it added), so that
    nothing but the error is left. Nothing is removed once a checkpoint exists (a resumable run)."""
    if (out / CHECKPOINT_FILE).exists():
        return
    if before.created is not None:  # the run folder, then each parent it made while empty (not another run's)
        shutil.rmtree(out, ignore_errors=True)
        folder = out.absolute()
        while folder != before.created and folder.parent != folder:
            folder = folder.parent
            try:
                folder.rmdir()
            except OSError:
                break
        return
    for path in out.iterdir():
        if path.name not in before.names and not path.is_dir():
            with contextlib.suppress(OSError):
                path.unlink()


def check_started_run(out: Path, settings: dict) -> None:
    """A run folder without a checkpoint but with the config.json of a run killed in its first epoch may
    be reused only by the same settings (UserError otherwise)."""
    path = out / CONFIG_FILE
    if (out / CHECKPOINT_FILE).exists() or not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
        saved = saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        saved = {}
    changed = changed_settings(saved, settings)
    if changed:
        raise UserError(f"{out} holds the start of another run ({path.name} differs: {', '.join(map(str, changed[:4]))}) "
                        "without a checkpoint: choose another --out, or delete that folder to start over")


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with atomic_open(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_metrics(path: Path, history: list[dict]) -> None:
    """metrics.csv: METRICS_COLUMNS, then ema_top1 (with an EMA), val_agreement and val_kl (when some epoch
    has a validation signal; empty for the others), then the loss terms."""
    columns = METRICS_COLUMNS + ((EMA_COLUMN,) if history and EMA_COLUMN in history[0] else ())
    columns += VAL_COLUMNS if any(VAL_COLUMNS[0] in row for row in history) else ()
    write_csv(path, with_terms(columns, history), history)


def with_terms(columns: tuple[str, ...], rows: list[dict]) -> tuple[str, ...]:
    """`columns` and then the loss terms (loss_<name>) found in `rows`, in order of appearance."""
    terms = dict.fromkeys(k for row in rows for k in row if k.startswith(TERM_PREFIX) and k not in columns)
    return columns + tuple(terms)


# --------------------------------------------------------------------------- the checkpoint
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

