"""Knowledge distillation of a student from synth's shards, with the frozen teacher run online.

    metrics = train(TrainConfig(shards="shards/mnist", student="lenet5_half", out="runs/kd"))

Each step takes a batch of stored images (pixels in [0, 1]) that the data pipeline has augmented for
the student, optionally mixes pairs of them (mixup), lets the teacher label exactly that view
(consistent teaching, Beyer et al. 2022) and trains the student on

    loss = KL(softmax(t/T) || softmax(s/T)) * T^2  +  ce_weight * CE(s, stored label)

with each model fed the view normalised with its own mean/std. With `teacher_logits="stored"` no
teacher is built: t is the logits stage one stored for the un-augmented image, so the student must
see that very view (aug "none", no mixup).

Under torchrun (WORLD_SIZE > 1) every rank runs `train`: the student is wrapped in DDP (gloo on the
CPU, nccl on GPUs), the shards are split across ranks per epoch, `batch_size_per_rank` is per rank; rank 0
alone checks the shard files (and shares the verdict), evaluates, holds the folder lock and writes.

Files in `out`: config.json (the resolved config), checkpoint.pt (after every epoch: student,
optimiser, scheduler, EMA, grad scaler, epoch, RNG state of every rank, config, metrics so far;
`resume` continues from it), metrics.csv (one row per epoch), steps.csv (loss and lr about 20 times
per epoch) and student.pt (the final student, `save_model_checkpoint` format; student_ema.pt too with
an EMA; student_best_val.pt with `keep="best-val"`, written under a pending name before the checkpoint of its
epoch and renamed after it).

Validation without real data (validation.py): with a held-out synthetic split (`val_shards`, by default
the shards' own val/ split) every epoch also logs val_agreement and val_kl, the student against the
teacher's stored logits there; `keep="best-val"` keeps the epoch they rank best.

Faults: before the first step the shard files are checked against the manifest (`verify_shards`) and
damaged ones refused or skipped (`on_bad_shard`), and the teacher and student are tried on one batch of
the shards' shape. Every file is written atomically (temp, fsync, rename), so a kill leaves the last
complete checkpoint; a NaN/Inf loss stops the run before it is checkpointed; a full disk is a UserError
naming the file. One `distill train` at a time per run folder (a lock file).

This file is the orchestration, read top to bottom; the parts live beside it: config.py (TrainConfig and
its validation), inputs.py (shards, models and evaluation data, checked before the folder is touched),
nets.py (teacher, student, their fit check), losses.py (the training losses), loop.py (one epoch),
run_folder.py (the folder and its files), checkpoint.py (fingerprint, save, load, restore).
"""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from dfkd.common import distributed
from dfkd.common.errors import DiskFullError, UserError
from dfkd.common.faults import fault_point
from dfkd.common.fileio import folder_lock, remove_stale_temps, write_json_atomic
from dfkd.common.models import save_model_checkpoint
from dfkd.common.remote import is_remote
from dfkd.common.shards import ShardFormatError, read_manifest

from .checkpoint import load_checkpoint, restore, rng_states, run_fingerprint, save_checkpoint
from .config import TrainConfig
from .datasets import unreadable_reason
from .engine import build_optimizer, evaluate_top1, resolve_device, warmup_cosine
from .inputs import RunInputs, prepare_inputs, stream_retry
from .loop import NonFiniteLoss, check_finite_weights, train_one_epoch
from .nets import Models
from .recipe import resolve_run
from .run_folder import (CHECKPOINT_FILE, CONFIG_FILE, EMA_COLUMN, EMA_FILE, METRICS_FILE, STEPS_COLUMNS, STEPS_FILE,
                         STUDENT_FILE, FolderBefore, check_out, elastic_restart, make_out, mark_job, remove_unstarted,
                         with_terms, write_csv, write_metrics)
from .throughput import ModelEma, check_amp, grad_scaler, to_memory_format, wrap_student, wrap_teacher
from .validation import BEST_VAL_FILE, NONE, VAL_COLUMNS, ValSet, best_epoch, measure, open_val_set


def train(config: TrainConfig) -> dict:
    """Distill `config.student` from the shards' teacher. Returns the final metrics: eval_top1 (None
    without eval data, and on ranks other than 0), teacher_top1, epochs, steps, train_loss (mean over
    ranks), images_per_s (all ranks together), skipped_shards, out. Everything that can be checked is
    checked before the run folder is created; a run that stops before its first checkpoint (damage
    found while reading a shard) removes what it created there. Under torchrun every rank calls this.
    The recipe (`config.recipe`, distill/recipe.py) fills the options `config`'s caller did not give;
    the start line on stderr says which one and why, config.json records it (`recipe_used`)."""
    manifest = read_manifest(config.shards)
    run = resolve_run(config, manifest)  # the recipe fills what the caller did not give
    config, restarted = elastic_restart(run.config.resolved())  # torchrun's restart of this job: as --resume
    if distributed.info().is_main:
        print(run.reason + (f"; {restarted}" if restarted else ""), file=sys.stderr, flush=True)
    val = open_val_set(config.val_shards, config.shards, manifest, config.verify_shards,
                       check_files=distributed.info().is_main, retry=stream_retry(config))
    if config.keep == "best-val" and val is None:
        raise UserError("--keep best-val ranks the epochs on a held-out synthetic split and there is none "
                        f"(--val-shards {config.val_shards}): pass --val-shards PATH, write one with `synth generate "
                        "--val-images N` (rerun on the same --out adds it), or use --keep last")
    config = replace(config, val_shards=val.location if val is not None else NONE)  # config.json records it
    out = check_out(config)
    device = distributed.device_for(resolve_device(config.device))
    check_amp(config.amp, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with distributed.process_group(distributed.backend_for(device)) as dist:
        inputs = prepare_inputs(config, device, dist, manifest)
        inputs.val = val if dist.is_main else None  # rank 0 measures, like the evaluation
        if not dist.is_main:  # rank 0 makes, locks and cleans the run folder; the others wait for it
            distributed.barrier()
            return _train(config, out, inputs, dist, run.record())
        before = FolderBefore.of(out)
        with folder_lock(make_out(out), "distill train"):
            remove_stale_temps(out)
            mark_job(out)
            distributed.barrier()
            try:
                return _train(config, out, inputs, dist, run.record())
            except Exception as e:
                remove_unstarted(out, before)  # failed before its first checkpoint: no run folder is left
                if isinstance(e, DiskFullError):
                    raise e.with_fix("make room (free space, or raise the quota or limit) and rerun with --resume: "
                                     "the run continues from its last checkpoint") from None
                raise



@dataclass
class _Run:
    """What the helpers of `_train` share: the run's settings, folder, models and optimisation."""

    config: TrainConfig
    out: Path
    inputs: RunInputs
    dist: distributed.DistInfo
    models: Models
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    fingerprint: dict
    log: Callable[[str], None]

    @property
    def checkpoint(self) -> Path:
        return self.out / CHECKPOINT_FILE

    @property
    def val_identity(self) -> dict | None:
        return self.inputs.val.identity if self.inputs.val is not None else None

    def save(self, epoch: int, history: list[dict], step_log: list[dict], rank_rngs: list[dict] | None,
             val_set: dict | None) -> None:
        save_checkpoint(self.checkpoint, self.models, self.optimizer, self.scheduler, epoch, history, self.config,
                        self.fingerprint, step_log, rank_rngs, val_set)


@dataclass
class _Resumed:
    """Where the run starts: after `epoch` finished epochs (0 and empty logs for a new run), with the
    checkpoint's per-rank RNG states and held-out split (None for a new run)."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    step_log: list[dict] = field(default_factory=list)
    rank_rngs: list[dict] | None = None
    val_set: dict | None = None


def _train(config: TrainConfig, out: Path, inputs: RunInputs,
           dist: distributed.DistInfo = distributed.DistInfo(), recipe: dict | None = None) -> dict:
    """The run itself, once the inputs are checked and the run folder is locked (by rank 0)."""
    run = _set_up(config, out, inputs, dist)
    start = _resume(run)
    history, step_log = start.history, start.step_log
    _wrap_models(run)
    if dist.is_main:
        _write_config_and_logs(run, recipe, history, step_log)
    teacher_top1 = _evaluate_teacher(run)
    _repair_last_epoch(run, start)
    if teacher_top1 is not None:
        run.log(f"teacher top-1 on {config.eval_data}: {teacher_top1:.2f}%")
    if dist.enabled:
        run.log(f"{dist.world_size} processes ({distributed.backend_for(inputs.device)}), {len(inputs.loader)} "
                f"steps of {dist.world_size} x {config.batch_size_per_rank} images per epoch")

    for epoch in range(start.epoch, config.epochs):
        stats = _train_epoch(run, epoch, step_log)
        train_loss = distributed.all_reduce_mean(stats["train_loss"], inputs.device)
        rank_rngs = distributed.all_gather_object(rng_states()) if dist.enabled else None
        measured, eval_failed = _evaluate_epoch(run)
        row = _epoch_row(run, epoch, stats, train_loss, measured)
        history.append(row)
        if not dist.is_main:
            continue
        _save_epoch(run, row, history, step_log, rank_rngs)
        if eval_failed is not None:
            raise _evaluation_failure(run, epoch, eval_failed)
        run.log(_epoch_line(run, row))
    return _finish(run, history, teacher_top1)


def _set_up(config: TrainConfig, out: Path, inputs: RunInputs, dist: distributed.DistInfo) -> _Run:
    """Optimiser, schedule, the models (EMA, grad scaler) and the fingerprint a resume must match."""
    student, teacher, steps = inputs.student, inputs.teacher, len(inputs.loader)
    optimizer = build_optimizer(student, config.opt, config.lr, config.wd)
    scheduler = warmup_cosine(optimizer, config.epochs * steps, round(config.warmup_epochs * steps))
    models = Models(model=student, student=student, teacher=teacher,
                    teacher_spec=teacher.input_spec if teacher is not None else None,
                    scaler=grad_scaler(config.amp, inputs.device),
                    ema=ModelEma(student, config.ema_decay) if config.ema_decay > 0 else None)
    fingerprint = run_fingerprint(config, inputs.manifest, inputs.manifest.teacher["weights_sha256"], dist.world_size)
    log = tqdm.write if config.progress and dist.is_main else (lambda message: None)
    return _Run(config, out, inputs, dist, models, optimizer, scheduler, fingerprint, log)


def _resume(run: _Run) -> _Resumed:
    """With --resume and a checkpoint: the run restored from it (refused when it is another run's)."""
    config, out = run.config, run.out
    if not config.resume:
        return _Resumed()
    if not run.checkpoint.is_file():
        run.log(f"no checkpoint in {out} yet: starting at epoch 1")
        if run.dist.is_main:
            promote_best_val(out, 0)
        return _Resumed()
    state = load_checkpoint(run.checkpoint, run.fingerprint)
    restore(state, run.models, run.optimizer, run.scheduler, run.checkpoint, run.dist.rank)
    history = state["history"]
    if run.dist.is_main and config.keep == "best-val":
        check_same_val_set(state.get("val_set"), run.val_identity, history, out)
        promote_best_val(out, state["epoch"])
    return _Resumed(state["epoch"], history, list(state.get("step_log", [])), state["rng"].get("ranks"),
                    state.get("val_set"))


def _wrap_models(run: _Run) -> None:
    """The student for training (DDP, compile), the teacher in its memory format (compile)."""
    config, inputs = run.config, run.inputs
    run.models.model = wrap_student(inputs.student, inputs.device, run.dist.enabled, config.compile)
    if inputs.teacher is not None:
        run.models.teacher = wrap_teacher(to_memory_format(inputs.teacher, config.channels_last), config.compile)


def _write_config_and_logs(run: _Run, recipe: dict | None, history: list[dict], step_log: list[dict]) -> None:
    """config.json, and the logs as of the checkpoint (a kill after it, before the logs, left them a step
    behind)."""
    out = run.out
    write_json_atomic(out / CONFIG_FILE, asdict(run.config) | {"world_size": run.dist.world_size,
                                                                "recipe_used": recipe})
    if history:
        write_metrics(out / METRICS_FILE, history)
        write_csv(out / STEPS_FILE, with_terms(STEPS_COLUMNS, step_log), step_log)


def _evaluate_teacher(run: _Run) -> float | None:
    """The teacher's top-1 on --eval-data (None without it)."""
    inputs, config = run.inputs, run.config
    if inputs.eval_teacher is None:
        return None
    try:
        return evaluate_top1(inputs.teacher, inputs.eval_teacher, inputs.device, config.workers)
    except OSError as e:  # an evaluation image damaged since the check (nothing trained yet)
        raise UserError(f"evaluating the teacher on {config.eval_data} failed ({unreadable_reason(e)}): replace or "
                        "remove that file, then rerun") from None


def _repair_last_epoch(run: _Run, start: _Resumed) -> None:
    """On resuming: evaluate and measure the last finished epoch if that failed (or --eval-data or
    --val-shards is new), and checkpoint it so."""
    config, inputs, out, history = run.config, run.inputs, run.out, start.history
    student, device, val = inputs.student, inputs.device, inputs.val
    if not history:
        return
    if history[-1]["eval_top1"] is None and inputs.eval_student is not None:
        history[-1]["eval_top1"] = evaluate_student(student, inputs.eval_student, device, config, out)
        if run.models.ema is not None:
            history[-1][EMA_COLUMN] = evaluate_student(run.models.ema.module, inputs.eval_student, device, config, out)
        if run.dist.is_main:
            run.save(start.epoch, history, start.step_log, start.rank_rngs, start.val_set)
            write_metrics(out / METRICS_FILE, history)
            run.log(f"epoch {start.epoch}: top-1 {history[-1]['eval_top1']:.2f}% (evaluated on resuming)")
    if val is not None and history[-1].get("val_agreement") is None:
        history[-1] |= measure_val(student, val, device, config, out)
        if config.keep == "best-val" and best_epoch(history) is history[-1]:
            save_best_val(out, student, run.fingerprint, history[-1])
        run.save(start.epoch, history, start.step_log, start.rank_rngs, run.val_identity)
        promote_best_val(out, start.epoch)
        write_metrics(out / METRICS_FILE, history)
        run.log(f"epoch {start.epoch}: {format_val(history[-1])} (measured on resuming)")


def _train_epoch(run: _Run, epoch: int, step_log: list[dict]) -> dict:
    """One epoch of training; the faults it can meet (bad shard data, divergence) as UserErrors."""
    config, inputs = run.config, run.inputs
    try:
        with torch.autograd.set_detect_anomaly(config.detect_anomaly):
            stats = train_one_epoch(run.models, inputs.loader, run.optimizer, run.scheduler, config, epoch,
                                    inputs.device, step_log, show=run.dist.is_main)
        check_finite_weights(inputs.student)
    except ShardFormatError as e:
        # from a DataLoader worker the message carries the worker's traceback: keep its last line
        reason = str(e).strip().splitlines()[-1].split("ShardFormatError: ", 1)[-1]
        fix = "" if "--on-bad-shard skip" in reason else f"; check the folder with `synth verify {config.shards}`"
        raise UserError(f"bad shard data in {config.shards}: {reason}{fix}") from None
    except NonFiniteLoss as e:
        raise diverged(run.out, epoch, str(e)) from None
    except RuntimeError as e:
        if config.detect_anomaly and "nan" in str(e).lower():
            raise diverged(run.out, epoch, str(e).strip().splitlines()[0][:200]) from None
        raise
    return stats


def _evaluate_epoch(run: _Run) -> tuple[dict, Exception | None]:
    """The epoch's validation signal and top-1 (and EMA top-1), and the exception if they failed: a failed
    evaluation must not lose the epoch, it is checkpointed first, then reported."""
    config, inputs, ema = run.config, run.inputs, run.models.ema
    unmeasured = {"eval_top1": None} | ({EMA_COLUMN: None} if ema is not None else {})
    measured = dict(unmeasured)
    signal = dict.fromkeys(VAL_COLUMNS) if inputs.val is not None else {}
    try:
        if inputs.val is not None:
            signal = measure(inputs.student, inputs.val, inputs.device, config.channels_last, config.verify_shards)
        if inputs.eval_student is not None:
            measured["eval_top1"] = evaluate_top1(inputs.student, inputs.eval_student, inputs.device, config.workers)
            if ema is not None:
                measured[EMA_COLUMN] = evaluate_top1(ema.module, inputs.eval_student, inputs.device, config.workers)
    except Exception as e:  # noqa: BLE001 (re-raised by the caller, after the checkpoint)
        return unmeasured | signal, e
    return measured | signal, None


def _epoch_row(run: _Run, epoch: int, stats: dict, train_loss: float, measured: dict) -> dict:
    """The epoch's row of metrics.csv."""
    steps, images = len(run.inputs.loader), _images_per_epoch(run)
    row = {"epoch": epoch + 1, "step": (epoch + 1) * steps, "lr": stats["lr"], "train_loss": train_loss,
           "eval_top1": measured["eval_top1"], "seconds": stats["seconds"], "images_per_s": images / stats["seconds"]}
    row |= {k: v for k, v in measured.items() if k != "eval_top1"}
    return row | {name: distributed.all_reduce_mean(value, run.inputs.device) for name, value in stats["terms"].items()}


def _images_per_epoch(run: _Run) -> int:
    return len(run.inputs.loader) * run.config.batch_size_per_rank * run.dist.world_size


def _save_epoch(run: _Run, row: dict, history: list[dict], step_log: list[dict],
                rank_rngs: list[dict] | None) -> None:
    """The best-val student (under a pending name), the checkpoint, the best-val student's final name, then
    the logs: a kill between them leaves student_best_val.pt as the checkpoint's ranking has it."""
    if run.config.keep == "best-val" and best_epoch(history) is row:
        save_best_val(run.out, run.inputs.student, run.fingerprint, row)
        fault_point("best-val-saved")
    run.save(row["epoch"], history, step_log, rank_rngs, run.val_identity)
    promote_best_val(run.out, row["epoch"])
    fault_point("epoch-saved")
    write_metrics(run.out / METRICS_FILE, history)
    write_csv(run.out / STEPS_FILE, with_terms(STEPS_COLUMNS, step_log), step_log)


def _evaluation_failure(run: _Run, epoch: int, error: Exception) -> Exception:
    """The error that reports a failed evaluation of a checkpointed epoch (the fix: rerun with --resume)."""
    config, out = run.config, run.out
    if isinstance(error, (ShardFormatError, UserError)):  # the held-out split
        reason = str(error).strip().splitlines()[-1]
        return UserError(f"measuring epoch {epoch + 1} on --val-shards {config.val_shards} failed ({reason}); "
                         f"the epoch is saved in {out / CHECKPOINT_FILE}: check the split with `synth verify "
                         f"{config.val_shards}`, then rerun with --resume, which measures it first")
    if not isinstance(error, OSError):
        return error
    return UserError(f"evaluating epoch {epoch + 1} on {config.eval_data} failed ({unreadable_reason(error)}); the "
                     f"epoch is saved in {out / CHECKPOINT_FILE} with its top-1 left empty: replace or "
                     "remove that file and rerun with --resume, which evaluates it first")


def _epoch_line(run: _Run, row: dict) -> str:
    return (f"epoch {row['epoch']}/{run.config.epochs}: loss {row['train_loss']:.4f}"
            + (f", top-1 {row['eval_top1']:.2f}%" if row["eval_top1"] is not None else "")
            + (f", EMA top-1 {row[EMA_COLUMN]:.2f}%" if row.get(EMA_COLUMN) is not None else "")
            + (f", {format_val(row)}" if run.inputs.val is not None else "")
            + f", {row['images_per_s']:.0f} img/s")


def _finish(run: _Run, history: list[dict], teacher_top1: float | None) -> dict:
    """student.pt (and student_ema.pt) from rank 0, and the final metrics."""
    config, out, models, final = run.config, run.out, run.models, history[-1]
    if run.dist.is_main:
        shards = config.shards if is_remote(config.shards) else str(Path(config.shards).resolve())
        extra = {"teacher_sha256": run.fingerprint["teacher_sha256"], "shards": shards,
                 "epochs": final["epoch"], "eval_top1": final["eval_top1"]}
        save_model_checkpoint(out / STUDENT_FILE, run.inputs.student, extra=extra)
        if models.ema is not None:
            save_model_checkpoint(out / EMA_FILE, models.ema.module, extra=extra | {"eval_top1": final.get(EMA_COLUMN)})
    distributed.barrier()  # rank 0 has written everything
    seconds = sum(row["seconds"] for row in history)
    best = best_epoch(history) if config.keep == "best-val" else None
    return {"eval_top1": final["eval_top1"], "teacher_top1": teacher_top1, "epochs": final["epoch"],
            "steps": final["step"], "train_loss": final["train_loss"],
            "images_per_s": final["step"] * config.batch_size_per_rank * run.dist.world_size / seconds,
            "skipped_shards": len(run.inputs.skipped), "out": str(out),
            "val_agreement": final.get("val_agreement"), "val_kl": final.get("val_kl"),
            "best_val_epoch": best["epoch"] if best is not None else None}


def format_val(row: dict) -> str:
    if row.get("val_agreement") is None:
        return "val not measured"
    return f"val agreement {row['val_agreement']:.2f}%, val KL {row['val_kl']:.4f}"


def measure_val(student: nn.Module, val: ValSet, device: torch.device, config: TrainConfig, out: Path) -> dict:
    """The validation signal of a restored student (resuming an epoch that lacks it); UserError if it fails."""
    try:
        return measure(student, val, device, config.channels_last, config.verify_shards)
    except (ShardFormatError, OSError) as e:
        raise UserError(f"measuring the last epoch in {out / CHECKPOINT_FILE} on --val-shards {val.location} failed "
                        f"({str(e).strip().splitlines()[-1]}): check it with `synth verify {val.location}`, or pass "
                        "--val-shards none") from None


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


def check_same_val_set(saved: dict | None, current: dict | None, history: list[dict], out: Path) -> None:
    """With --keep best-val the epochs of a run must be ranked on one held-out split: UserError when the
    checkpoint's epochs were measured on another one than the resumed run measures on."""
    if best_epoch(history) is None or saved is None or current is None:
        return
    if saved.get("shards") != current["shards"]:
        raise UserError(f"{out / CHECKPOINT_FILE} ranked its epochs for --keep best-val on the held-out split "
                        f"{saved.get('location')}, not on {current['location']}: resume with --val-shards "
                        f"{saved.get('location')} (the same shards), or train into another --out")


def evaluate_student(model: nn.Module, dataset, device: torch.device, config: TrainConfig, out: Path) -> float:
    """Top-1 of a restored student (resuming an epoch whose evaluation is missing); UserError if it fails."""
    try:
        return evaluate_top1(model, dataset, device, config.workers)
    except OSError as e:
        raise UserError(f"evaluating the last epoch in {out / CHECKPOINT_FILE} on {config.eval_data} failed "
                        f"({unreadable_reason(e)}): replace or remove that file and rerun with --resume") from None


def diverged(out: Path, epoch: int, reason: str) -> UserError:
    """The error that stops a run whose loss or weights became NaN/Inf in epoch `epoch` (0-based)."""
    kept = (f"{out / CHECKPOINT_FILE} still holds epoch {epoch}, the last good one" if epoch > 0
            else "no checkpoint was written")
    return UserError(f"training stopped in epoch {epoch + 1}: {reason}; {kept}. Lower --lr (or --temperature, "
                     "--mixup) and train into a new --out, or rerun with --detect-anomaly to find the operation")
