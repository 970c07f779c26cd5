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
optimiser, scheduler with its cool-down, EMA, grad scaler, epoch, RNG state of every rank, config, metrics
so far; `resume` continues from it), metrics.csv (one row per epoch; with the stopping rule its phase:
train, then cool-down), steps.csv (loss and lr about 20 times per epoch) and student.pt (the final
student, `save_model_checkpoint` format; student_ema.pt too with an EMA; student_best_val.pt with
`keep="best-val"`, written under a pending name before the checkpoint of its epoch and renamed after it).

Validation without real data (validation.py): with a held-out synthetic split (`val_shards`, by default
the shards' own val/ split) every epoch also logs val_agreement and val_kl, the student against the
teacher's stored logits there; `keep="best-val"` keeps the epoch they rank best.

The stopping rule (stopping.py; `stop_patience` > 0, needs the held-out split): `epochs` is then a cap. Once
the held-out KL has not fallen by `stop_min_delta` (relative) below its best for `stop_patience` epochs, the
learning rate anneals from its current value to 0 over a cool-down of `stop_cooldown` x the epochs run
(engine.cool_down, in the per-step schedule the checkpoint keeps) and the run ends there. The decision is
a function of the history's val_kl alone, so a resumed run makes it at the same epoch as an uninterrupted
one; the per-epoch line says when it triggers, the result says why the run ended (`end_reason`).

Faults: before the first step the shard files are checked against the manifest (`verify_shards`) and
damaged ones refused or skipped (`on_bad_shard`), and the teacher and student are tried on one batch of
the shards' shape. Every file is written atomically (temp, fsync, rename), so a kill leaves the last
complete checkpoint; a NaN/Inf loss stops the run before it is checkpointed; a full disk is a UserError
naming the file. One `distill train` at a time per run folder (a lock file).

This file is the orchestration, `train` read top to bottom: the settings are unpacked once into what each
part needs, everything that can be checked is checked before the run folder is touched, then the epochs,
each calling every part once. The parts live beside it: config.py (TrainConfig and its validation),
inputs.py (shards, models, evaluation data and held-out split, checked before the folder is touched),
nets.py (teacher, student, their fit check), engine.py (optimiser, schedule, EMA), stopping.py (the
stopping rule on the held-out KL), losses/ (the training losses, one file each), augment.py (augmentations
and batch mixing), loop.py (one epoch of steps, and the faults it can meet), evaluation.py (top-1 on real
data, the held-out split's signal), run_folder.py (the folder and every file in it: config.json,
checkpoint, logs, students).
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from dfkd.common import distributed
from dfkd.common.accel import grad_scaler, prepare_device, to_memory_format
from dfkd.common.recipes import resolve_recipe
from dfkd.common.shards import read_manifest

from .augment import Mixing
from .config import TrainConfig, run_settings
from .engine import ModelEma, build_optimizer, cool_down, warmup_cosine
from .evaluation import EMA_COLUMN, format_val
from .inputs import prepare_inputs
from .loop import Step, check_finite_weights, epoch_faults, train_one_epoch
from .losses import LOSSES
from .nets import Models
from .run_folder import Resumed, RunFolder, check_out, elastic_restart, rng_states, run_fingerprint
from .stopping import PHASE_COLUMN, StopRule, Trigger, phase, run_end
from .throughput import wrap_student, wrap_teacher
from .validation import VAL_COLUMNS, best_epoch


def train(config: TrainConfig) -> dict:
    """Distill `config.student` from the shards' teacher. Returns the final metrics: eval_top1 (None
    without eval data, and on ranks other than 0), teacher_top1, epochs, steps, train_loss (mean over
    ranks), images_per_s (all ranks together), skipped_shards, out, the validation signal (val_agreement,
    val_kl, best_val_epoch) and how the run ended: stopped_epoch and stop_trigger_epoch (the stopping rule's;
    None when it did not trigger), end_reason (in words). Everything that can be checked is
    checked before the run folder is created; a run that stops before its first checkpoint (damage
    found while reading a shard) removes what it created there. Under torchrun every rank calls this.
    The recipe (`config.recipe`, common.recipes.resolve_recipe) fills the options `config`'s caller did
    not give; the start line on stderr says which one and why, config.json records it (`recipe_used`)."""
    manifest = read_manifest(config.shards)
    run = resolve_recipe(config, manifest=manifest)  # the recipe fills what the caller did not give
    resume, restarted = elastic_restart(Path(run.config.out), run.config.resume)   # torchrun's restart: as --resume
    config = replace(run.config, resume=resume)
    loss_config = run.plugin          # the options of the loss config.loss
    if distributed.info().is_main:
        print(run.reason + (f"; {restarted}" if restarted else ""), file=sys.stderr, flush=True)
    out = check_out(Path(config.out), config.shards, config.resume, run_settings(config, loss_config))
    device = prepare_device(config.device, config.amp)
    with distributed.process_group(distributed.backend_for(device)) as dist:
        inputs = prepare_inputs(config, device, dist, manifest)
        config = replace(config, val_shards=inputs.val_shards)  # recorded
        student = inputs.student
        teacher = inputs.teacher      # None: the stored logits
        loader = inputs.loader
        evaluation = inputs.evaluation
        epochs = config.epochs
        steps = len(loader)           # per epoch
        is_main = dist.is_main
        log = tqdm.write if config.progress and is_main else (lambda message: None)

        # the run folder's files: config.json and the checkpoint record the settings, a resume must keep the
        # hashed ones (the fingerprint)
        settings = run_settings(config, loss_config)
        hashed = run_settings(config, loss_config, hashed_only=True)
        fingerprint = run_fingerprint(hashed, inputs.manifest, inputs.manifest.teacher["weights_sha256"],
                                      dist.world_size)
        val = evaluation.val
        rule = StopRule.of(config)    # None: the fixed schedule of --epochs (stopping.py)
        folder = RunFolder(out, settings, fingerprint, config.keep == "best-val", val.identity if val else None,
                           stop_rule=rule is not None)
        with folder.claimed(is_main):  # rank 0 makes, locks and cleans the run folder; the others wait for it
            # how each step runs (the loss with its own config), the optimisation and the models
            step = Step(LOSSES[config.loss](loss_config), Mixing(config.mixup, config.cutmix), device, config.amp,
                        config.channels_last, config.teacher_view == "native", config.clip_grad)
            optimizer = build_optimizer(student, config.opt, config.lr, config.wd)
            scheduler = warmup_cosine(optimizer, epochs * steps, round(config.warmup_epochs * steps))
            models = Models(model=student, student=student, teacher=teacher,
                            teacher_spec=teacher.input_spec if teacher is not None else None,
                            scaler=grad_scaler(config.amp, device),
                            ema=ModelEma(student, config.ema_decay) if config.ema_decay > 0 else None)

            # where the run starts: after the checkpoint's epochs with --resume
            start = folder.resume(models, optimizer, scheduler, dist.rank, is_main, log) if config.resume else Resumed()
            history = start.history       # a row per finished epoch (metrics.csv)
            step_log = start.step_log     # a row per window of steps (steps.csv)
            models.model = wrap_student(student, device, dist.enabled, config.compile)  # DDP, compile
            if teacher is not None:
                models.teacher = wrap_teacher(to_memory_format(teacher, config.channels_last), config.compile)
            if is_main:
                folder.write_config(dist.world_size, run.record(), history, step_log)
            teacher_top1 = evaluation.teacher_top1(teacher)
            if history:  # resumed: the last epoch first, if its evaluation failed (or --eval-data, --val-shards is new)
                missing = evaluation.missing(history[-1], student, models.ema, folder.checkpoint)
                history[-1] |= missing
                if VAL_COLUMNS[0] in missing:  # ranked anew for --keep best-val, saved as the epoch was
                    folder.save_epoch(models, optimizer, scheduler, history, step_log, start.rank_rngs)
                elif missing:
                    folder.save(models, optimizer, scheduler, history, step_log, start.rank_rngs, start.val_set)
                    folder.write_logs(history)
                if "eval_top1" in missing:
                    log(f"epoch {start.epoch}: top-1 {history[-1]['eval_top1']:.2f}% (evaluated on resuming)")
                if VAL_COLUMNS[0] in missing:
                    log(f"epoch {start.epoch}: {format_val(history[-1])} (measured on resuming)")
            stop = decide(rule, history, is_main)  # resumed: the trigger of the epochs so far, as they made it
            if stop is not None:
                cool_down(scheduler, stop.epoch * steps, stop.cooldown * steps)
                log(f"{stop.describe()} (the epochs before resuming decided it)")
            if teacher_top1 is not None:
                log(f"teacher top-1 on {config.eval_data}: {teacher_top1:.2f}%")
            if dist.enabled:
                log(f"{dist.world_size} processes ({distributed.backend_for(device)}), {steps} steps of "
                    f"{dist.world_size} x {config.batch_size_per_rank} images per epoch")

            for epoch in range(start.epoch, epochs):
                if stop is not None and epoch >= stop.end:  # the cool-down is over
                    break
                with epoch_faults(epoch, config.shards, folder.checkpoint, config.detect_anomaly):
                    stats = train_one_epoch(models, loader, optimizer, scheduler, step, epoch, epochs, step_log,
                                            show=config.progress and is_main)
                    check_finite_weights(student)
                train_loss = distributed.all_reduce_mean(stats["train_loss"], device)
                rank_rngs = distributed.all_gather_object(rng_states()) if dist.enabled else None
                measured, failure = evaluation.epoch_metrics(student, models.ema)
                images = steps * config.batch_size_per_rank * dist.world_size
                row = {"epoch": epoch + 1, "step": (epoch + 1) * steps, "lr": stats["lr"], "train_loss": train_loss,
                       "eval_top1": measured["eval_top1"], "seconds": stats["seconds"],
                       "images_per_s": images / stats["seconds"]}
                row |= {k: v for k, v in measured.items() if k != "eval_top1"}
                row |= {name: distributed.all_reduce_mean(value, device) for name, value in stats["terms"].items()}
                if rule is not None:
                    row[PHASE_COLUMN] = phase(stop, epoch + 1)
                history.append(row)
                triggered = stop is None and decide(rule, history, is_main)
                if triggered:  # before the checkpoint: the cool-down is part of the scheduler it saves
                    stop = triggered
                    cool_down(scheduler, stop.epoch * steps, stop.cooldown * steps)
                if not is_main:
                    continue
                folder.save_epoch(models, optimizer, scheduler, history, step_log, rank_rngs)
                if failure is not None:  # the epoch is saved: report the evaluation's failure now
                    raise evaluation.failure(epoch, failure, folder.checkpoint)
                log(f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}"
                    + (f", top-1 {row['eval_top1']:.2f}%" if row["eval_top1"] is not None else "")
                    + (f", EMA top-1 {row[EMA_COLUMN]:.2f}%" if row.get(EMA_COLUMN) is not None else "")
                    + (f", {format_val(row)}" if val is not None else "")
                    + f", {row['images_per_s']:.0f} img/s")
                if triggered:
                    log(stop.describe())

            final = history[-1]
            if is_main:
                folder.save_students(models, final, config.shards)
            distributed.barrier()  # rank 0 has written everything
    best = best_epoch(history) if config.keep == "best-val" else None
    return {"eval_top1": final["eval_top1"], "teacher_top1": teacher_top1, "epochs": final["epoch"],
            "steps": final["step"], "train_loss": final["train_loss"],
            "images_per_s": final["step"] * config.batch_size_per_rank * dist.world_size
            / sum(row["seconds"] for row in history),
            "skipped_shards": len(inputs.skipped), "out": str(out),
            "val_agreement": final.get("val_agreement"), "val_kl": final.get("val_kl"),
            "best_val_epoch": best["epoch"] if best is not None else None,
            "stopped_epoch": stop.end if stop is not None else None,
            "stop_trigger_epoch": stop.epoch if stop is not None else None,
            "end_reason": run_end(final["epoch"], epochs, rule, stop.epoch if stop is not None else None)}


def decide(rule: StopRule | None, history: list[dict], is_main: bool) -> Trigger | None:
    """The stopping rule's decision on the epochs of `history` (None: not triggered, or no rule), the same on
    every rank: rank 0 alone measures the held-out split, the others take its decision."""
    if rule is None:
        return None
    return distributed.broadcast_object(rule.decide(history) if is_main else None)
