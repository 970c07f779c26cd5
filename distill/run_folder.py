"""The run folder of `distill train` and every file in it: the checks before it is touched (a previous run
is continued only with --resume, the start of another run is refused), its claim for the run (made, locked,
left empty by a run that fails before its first checkpoint), and `RunFolder`, what the run writes there:
config.json, the checkpoint (its fingerprint, RNG states, atomic writing, resume), metrics.csv and steps.csv,
the final students and, with --keep best-val, the best-val student.

    folder = RunFolder(out, settings, fingerprint, keep_best_val=True, val_set=val.identity)
    start = folder.resume(models, optimizer, scheduler)      # with --resume
    folder.save_epoch(models, optimizer, scheduler, history, step_log, rank_rngs)

A kill leaves the folder consistent: every file is written atomically (temp, fsync, rename), and the
best-val student of an epoch is written under a pending name before that epoch's checkpoint and renamed
after it (`promote_best_val`), so student_best_val.pt is always the one the checkpoint's ranking keeps."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from dfkd.common import distributed
from dfkd.common.errors import DiskFullError, UserError
from dfkd.common.faults import fault_point
from dfkd.common.fileio import (atomic_open, folder_lock, load_torch_safely, make_folder, remove_stale_temps,
                                save_torch_atomic, write_bytes_atomic, write_json_atomic)
from dfkd.common.models import save_model_checkpoint
from dfkd.common.remote import is_remote
from dfkd.common.shards import MANIFEST_NAME, Manifest

from .config import ORDER_CHANGES, changed_settings
from .nets import Models
from .stopping import PHASE_COLUMN
from .validation import BEST_VAL_FILE, VAL_COLUMNS, best_epoch

CONFIG_FILE, CHECKPOINT_FILE, METRICS_FILE, STUDENT_FILE = "config.json", "checkpoint.pt", "metrics.csv", "student.pt"
STEPS_FILE, EMA_FILE = "steps.csv", "student_ema.pt"
METRICS_COLUMNS = ("epoch", "step", "lr", "train_loss", "eval_top1", "seconds", "images_per_s")
EMA_COLUMN = "ema_top1"  # appended with ema_decay > 0
STEPS_COLUMNS = ("epoch", "step", "lr", "train_loss")  # then one loss_<name> column per term of the loss
TERM_PREFIX = "loss_"
# the torchrun job (TORCHELASTIC_RUN_ID) that last started or continued the run in this folder: its restarts
# continue the run without --resume
JOB_FILE = ".torchrun-job"
RESTART_ENV, MAX_RESTARTS_ENV, JOB_ENV = "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID"


def elastic_restart(out: Path, resume: bool) -> tuple[bool, str | None]:
    """Under torchrun's restart of a failed job (`--max-restarts N`; TORCHELASTIC_RESTART_COUNT > 0): resume
    (True) when the run in `out` is this job's own (its JOB_FILE names TORCHELASTIC_RUN_ID) or there is none
    yet, and the words for the start line. Otherwise (a first start, --resume given, a run another job left)
    `resume` as it is: a restart never continues a run it did not start."""
    restart = os.environ.get(RESTART_ENV, "0")
    if resume or not restart.isdigit() or int(restart) == 0:
        return resume, None
    job = os.environ.get(JOB_ENV, "")
    try:
        ours = (out / JOB_FILE).read_text().strip() == job
    except OSError:
        ours = False
    if (out / CHECKPOINT_FILE).exists() and not ours:
        return resume, None
    limit = os.environ.get(MAX_RESTARTS_ENV, "?")
    return True, (f"torchrun restart {restart} of {limit}: continuing the run in {out} from its last checkpoint, "
                  "as with --resume")


def mark_job(out: Path) -> None:
    """Record the torchrun job that runs in `out` (JOB_FILE; nothing outside torchrun's elastic agent)."""
    job = os.environ.get(JOB_ENV)
    if job:
        write_bytes_atomic(out / JOB_FILE, f"{job}\n".encode())


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
    has a validation signal; empty for the others), phase (with the stopping rule: train, then cool-down
    after its trigger), then the loss terms."""
    columns = METRICS_COLUMNS + ((EMA_COLUMN,) if history and EMA_COLUMN in history[0] else ())
    columns += VAL_COLUMNS if any(VAL_COLUMNS[0] in row for row in history) else ()
    columns += (PHASE_COLUMN,) if any(PHASE_COLUMN in row for row in history) else ()
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


# --------------------------------------------------------------------------- --keep best-val
def save_best_val(out: Path, student: nn.Module, fingerprint: dict, row: dict) -> None:
    """The student of epoch `row`, the best so far by the validation signal, under a pending name
    (`promote_best_val` makes it student_best_val.pt once the checkpoint of that epoch is saved)."""
    extra = {"teacher_sha256": fingerprint["teacher_sha256"], "epochs": row["epoch"], "eval_top1": row["eval_top1"],
             "val_agreement": row["val_agreement"], "val_kl": row["val_kl"]}
    save_model_checkpoint(out / f"{BEST_VAL_FILE}.epoch{row['epoch']}.pending", student, extra=extra)


def promote_best_val(out: Path, checkpointed_epoch: int) -> None:
    """A pending best-val student of an epoch the checkpoint holds becomes student_best_val.pt; one of a later
    epoch (killed before its checkpoint: that epoch is trained again, and may rank otherwise) is removed."""
    pending = sorted(out.glob(f"{BEST_VAL_FILE}.epoch*.pending"),
                     key=lambda p: int(p.name[len(BEST_VAL_FILE) + len(".epoch"):-len(".pending")]))
    for path in pending:
        epoch = int(path.name[len(BEST_VAL_FILE) + len(".epoch"):-len(".pending")])
        if epoch <= checkpointed_epoch:
            os.replace(path, out / BEST_VAL_FILE)
        else:
            path.unlink()


def check_same_val_set(saved: dict | None, current: dict | None, history: list[dict], out: Path,
                       uses: str = "ranked its epochs for --keep best-val") -> None:
    """With --keep best-val (or the stopping rule, --stop-patience) the epochs of a run must be compared on one
    held-out split: UserError when the checkpoint's epochs were measured on another one than the resumed run
    measures on. `uses`: what the run did with the split, for the message."""
    if best_epoch(history) is None or saved is None or current is None:
        return
    if saved.get("shards") != current["shards"]:
        raise UserError(f"{out / CHECKPOINT_FILE} {uses} on the held-out split "
                        f"{saved.get('location')}, not on {current['location']}: resume with --val-shards "
                        f"{saved.get('location')} (the same shards), or train into another --out")


# --------------------------------------------------------------------------- the run's files
@dataclass
class Resumed:
    """Where a run starts: after `epoch` finished epochs (0 and empty logs for a new run), with the
    checkpoint's per-rank RNG states and held-out split (None for a new run)."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    step_log: list[dict] = field(default_factory=list)
    rank_rngs: list[dict] | None = None
    val_set: dict | None = None


@dataclass
class RunFolder:
    """What a run writes into its folder `path` (rank 0 alone saves; every rank resumes): `settings` (the
    run's, config.run_settings) go into config.json and the checkpoint, `fingerprint` (run_fingerprint) is
    what a resume must agree on, `val_set` the held-out split the epochs are measured on (ValSet.identity;
    None without one), by which `keep_best_val` keeps the best-val student and `stop_rule` (--stop-patience)
    decides when the run ends."""

    path: Path
    settings: dict
    fingerprint: dict
    keep_best_val: bool = False
    val_set: dict | None = None
    stop_rule: bool = False

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @contextlib.contextmanager
    def claimed(self, is_main: bool = True) -> Iterator[None]:
        """The folder held for the run: rank 0 makes it, locks it (one `distill train` at a time) and removes
        the temp files of a killed predecessor while the other ranks wait for it. A run that fails before
        its first checkpoint leaves nothing there (`remove_unstarted`); a full disk's error says to resume."""
        if not is_main:
            distributed.barrier()
            yield
            return
        before = FolderBefore.of(self.path)
        with folder_lock(make_folder(self.path, "--out"), "distill train"):
            remove_stale_temps(self.path)
            mark_job(self.path)
            distributed.barrier()
            try:
                yield
            except Exception as e:
                remove_unstarted(self.path, before)  # failed before its first checkpoint: no run folder is left
                if isinstance(e, DiskFullError):
                    raise e.with_fix("make room (free space, or raise the quota or limit) and rerun with --resume: "
                                     "the run continues from its last checkpoint") from None
                raise

    def resume(self, models: Models, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, rank: int = 0, is_main: bool = True,
               log: Callable[[str], None] = print) -> Resumed:
        """The run restored from its checkpoint (refused when it is another run's); a new run without one."""
        if not self.checkpoint.is_file():
            log(f"no checkpoint in {self.path} yet: starting at epoch 1")
            if is_main:
                promote_best_val(self.path, 0)
            return Resumed()
        state = load_checkpoint(self.checkpoint, self.fingerprint)
        restore(state, models, optimizer, scheduler, self.checkpoint, rank)
        history = state["history"]
        if is_main and (self.keep_best_val or self.stop_rule):
            uses = " and ".join(use for use, on in (("ranked its epochs for --keep best-val", self.keep_best_val),
                                                    ("compared its epochs for --stop-patience", self.stop_rule)) if on)
            check_same_val_set(state.get("val_set"), self.val_set, history, self.path, uses)
        if is_main and self.keep_best_val:
            promote_best_val(self.path, state["epoch"])
        return Resumed(state["epoch"], history, list(state.get("step_log", [])), state["rng"].get("ranks"),
                       state.get("val_set"))

    def write_config(self, world_size: int, recipe: dict | None, history: list[dict], step_log: list[dict]) -> None:
        """config.json, and the logs as of the checkpoint (a kill after it, before the logs, left them a step
        behind)."""
        write_json_atomic(self.path / CONFIG_FILE, self.settings | {"world_size": world_size, "recipe_used": recipe})
        if history:
            self.write_logs(history, step_log)

    def write_logs(self, history: list[dict], step_log: list[dict] | None = None) -> None:
        """metrics.csv, and steps.csv unless `step_log` is None."""
        write_metrics(self.path / METRICS_FILE, history)
        if step_log is not None:
            write_csv(self.path / STEPS_FILE, with_terms(STEPS_COLUMNS, step_log), step_log)

    def save(self, models: Models, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, history: list[dict], step_log: list[dict],
             rank_rngs: list[dict] | None, val_set: dict | None) -> None:
        """The checkpoint after the epochs of `history`."""
        save_checkpoint(self.checkpoint, models, optimizer, scheduler, history[-1]["epoch"], history, self.settings,
                        self.fingerprint, step_log, rank_rngs, val_set)

    def save_epoch(self, models: Models, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, history: list[dict], step_log: list[dict],
                   rank_rngs: list[dict] | None) -> None:
        """An epoch's files: the best-val student (under a pending name), the checkpoint, the best-val
        student's final name, then the logs: a kill between them leaves student_best_val.pt as the
        checkpoint's ranking has it."""
        row = history[-1]
        if self.keep_best_val and best_epoch(history) is row:
            save_best_val(self.path, models.student, self.fingerprint, row)
            fault_point("best-val-saved")
        self.save(models, optimizer, scheduler, history, step_log, rank_rngs, self.val_set)
        promote_best_val(self.path, row["epoch"])
        fault_point("epoch-saved")
        self.write_logs(history, step_log)

    def save_students(self, models: Models, final: dict, shards: str) -> None:
        """student.pt (and student_ema.pt) of the last epoch, `final`, trained on `shards`."""
        shards = shards if is_remote(shards) else str(Path(shards).resolve())
        extra = {"teacher_sha256": self.fingerprint["teacher_sha256"], "shards": shards,
                 "epochs": final["epoch"], "eval_top1": final["eval_top1"]}
        save_model_checkpoint(self.path / STUDENT_FILE, models.student, extra=extra)
        if models.ema is not None:
            save_model_checkpoint(self.path / EMA_FILE, models.ema.module,
                                  extra=extra | {"eval_top1": final.get(EMA_COLUMN)})
