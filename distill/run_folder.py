"""The run folder: its files, the checks before it is touched (a previous run is continued only with
--resume, or by torchrun's restart of the job that started it; the start of another run is refused), its
creation and the CSV logs written into it."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from dfkd.common.errors import UserError
from dfkd.common.fileio import atomic_open, write_bytes_atomic
from dfkd.common.options import differences
from dfkd.common.remote import is_remote
from dfkd.common.shards import MANIFEST_NAME

from .config import TrainConfig, renamed, setting_defaults
from .validation import VAL_COLUMNS

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


def elastic_restart(config: TrainConfig) -> tuple[TrainConfig, str | None]:
    """Under torchrun's restart of a failed job (`--max-restarts N`; TORCHELASTIC_RESTART_COUNT > 0): `config`
    with resume on, when the run in --out is this job's own (its JOB_FILE names TORCHELASTIC_RUN_ID) or
    there is none yet, and the words for the start line. Otherwise (a first start, --resume given, a run
    another job left) `config` as it is: a restart never continues a run it did not start."""
    restart = os.environ.get(RESTART_ENV, "0")
    if config.resume or not restart.isdigit() or int(restart) == 0:
        return config, None
    out = Path(config.out)
    job = os.environ.get(JOB_ENV, "")
    try:
        ours = (out / JOB_FILE).read_text().strip() == job
    except OSError:
        ours = False
    if (out / CHECKPOINT_FILE).exists() and not ours:
        return config, None
    limit = os.environ.get(MAX_RESTARTS_ENV, "?")
    return replace(config, resume=True), (f"torchrun restart {restart} of {limit}: continuing the run in {out} from "
                                          "its last checkpoint, as with --resume")


def mark_job(out: Path) -> None:
    """Record the torchrun job that runs in `out` (JOB_FILE; nothing outside torchrun's elastic agent)."""
    job = os.environ.get(JOB_ENV)
    if job:
        write_bytes_atomic(out / JOB_FILE, f"{job}\n".encode())


def check_out(config: TrainConfig) -> Path:
    """The run folder, checked without touching it: refuse to start over a previous run unless resuming it."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the run")
    if not is_remote(config.shards) and out.resolve() == Path(config.shards).resolve():
        raise UserError(f"--out {out} is the shards folder; give the run its own folder")
    if not config.resume and (out / CHECKPOINT_FILE).exists():
        raise UserError(f"{out} already holds a run: pass --resume to continue it or choose another --out")
    check_started_run(out, config)
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


def make_out(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out} ({e.strerror}); choose a writable folder") from None
    return out


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


def check_started_run(out: Path, config: TrainConfig) -> None:
    """A run folder without a checkpoint but with the config.json of a run killed in its first epoch may
    be reused only by the same settings (UserError otherwise)."""
    path = out / CONFIG_FILE
    if (out / CHECKPOINT_FILE).exists() or not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
        saved = renamed(saved) if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        saved = {}
    changed = differences(saved, asdict(config), TrainConfig, setting_defaults())
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

