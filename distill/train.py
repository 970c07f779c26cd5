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
CPU, nccl on GPUs), the shards are split across ranks per epoch, `batch_size` is per rank; rank 0
alone checks the shard files (and shares the verdict), evaluates, holds the folder lock and writes.

Files in `out`: config.json (the resolved config), checkpoint.pt (after every epoch: student,
optimiser, scheduler, EMA, grad scaler, epoch, RNG state of every rank, config, metrics so far;
`resume` continues from it), metrics.csv (one row per epoch), steps.csv (loss and lr about 20 times
per epoch) and student.pt (the final student, `save_model_checkpoint` format; student_ema.pt too with
an EMA).

Faults: before the first step the shard files are checked against the manifest (`verify_shards`) and
damaged ones refused or skipped (`on_bad_shard`), and the teacher and student are tried on one batch of
the shards' shape. Every file is written atomically (temp, fsync, rename), so a kill leaves the last
complete checkpoint; a NaN/Inf loss stops the run before it is checkpointed; a full disk is a UserError
naming the file. One `distill train` at a time per run folder (a lock file).
"""
from __future__ import annotations

import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import distributed
from common.data import real_dataset, unreadable_reason
from common.errors import DiskFullError, UserError
from common.faults import fault_point
from common.fileio import (atomic_open, folder_lock, load_torch_safely, remove_stale_temps, save_torch_atomic,
                           write_json_atomic)
from common.models import CheckpointError, create_model, save_model_checkpoint, state_dict_sha256
from common.remote import is_remote
from common.shards import CHECK_LEVELS, Manifest, ShardFormatError, check_shard_files, read_manifest

from .data import AUGMENTATIONS, Batch, ShardLoader
from .engine import OPTIMIZERS, build_optimizer, evaluate_top1, resolve_device, warmup_cosine
from .throughput import (AMP_MODES, ModelEma, autocast, batch_to, check_amp, grad_scaler, to_memory_format,
                         wrap_student, wrap_teacher)

DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}
DEFAULT_WD = {"sgd": 5e-4, "adamw": 0.05}
CONFIG_FILE, CHECKPOINT_FILE, METRICS_FILE, STUDENT_FILE = "config.json", "checkpoint.pt", "metrics.csv", "student.pt"
STEPS_FILE, EMA_FILE = "steps.csv", "student_ema.pt"
METRICS_COLUMNS = ("epoch", "step", "lr", "train_loss", "eval_top1", "seconds", "images_per_s")
EMA_COLUMN = "ema_top1"  # appended with ema_decay > 0
TEACHER_LOGITS = ("online", "stored")
STEPS_COLUMNS = ("epoch", "step", "lr", "train_loss")
LOG_POINTS_PER_EPOCH = 20
BAD_SHARD_POLICIES = ("error", "skip")
# Settings that may change when resuming: paths (the shards and the teacher are checked by checksum
# instead), evaluation and how the run is executed. Everything else must match the checkpoint.
RESUMABLE_CHANGES = ("shards", "out", "teacher_weights", "eval_data", "data_root", "workers", "device",
                     "resume", "progress", "verify_shards", "on_bad_shard", "detect_anomaly",
                     "channels_last", "compile", "pin_memory", "persistent_workers")


@dataclass
class TrainConfig:
    """A distillation run. `lr`/`wd` of None take the optimiser's default (DEFAULT_LR, DEFAULT_WD)."""

    shards: str                         # folder written by `synth generate`
    student: str                        # registry model name
    out: str                            # run folder
    teacher_weights: str | None = None  # None: the weights recorded in the manifest
    student_weights: str = "none"       # initial student weights: none, DEFAULT or a checkpoint path
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    opt: str = "sgd"
    lr: float | None = None
    wd: float | None = None
    warmup_epochs: float = 1.0
    # distillation
    temperature: float = 4.0
    ce_weight: float = 0.0
    mixup: float = 0.0                  # Beta(alpha, alpha) mixing of image pairs; 0 = off
    aug: str = "translate"
    # execution and evaluation
    workers: int = 2
    eval_data: str | None = None        # "mnist" or an ImageFolder path
    data_root: str = "data"
    seed: int = 0
    device: str = "auto"
    resume: bool = False                # continue the run in `out` from its checkpoint (if it has one)
    progress: bool = True
    # faults
    verify_shards: str = "full"         # before the first step: full (size + sha256), size, none
    on_bad_shard: str = "error"         # a shard that does not match the manifest: error, or skip it
    detect_anomaly: bool = False        # torch.autograd anomaly detection (slow): names the op making NaN
    # stored teacher logits, regularisation (change results; off by default)
    teacher_logits: str = "online"      # online: the teacher labels the student's view; stored: the shards' logits
    label_smoothing: float = 0.0        # of the CE term (needs ce_weight > 0)
    clip_grad: float = 0.0              # max global gradient norm; 0 = off
    ema_decay: float = 0.0              # EMA of the student's weights, per step (e.g. 0.999); 0 = off
    amp: str = "none"                   # none, bf16 (CPU/GPU autocast), fp16 (GPU, GradScaler)
    # speed only
    channels_last: bool = False
    compile: bool = False               # torch.compile student and teacher
    pin_memory: bool = False            # page-locked batches (CUDA only; ignored on the CPU)
    persistent_workers: bool = False    # keep DataLoader workers alive between epochs

    def resolved(self) -> "TrainConfig":
        """This config with the optimiser defaults filled in; UserError for an out-of-range value."""
        if self.opt not in OPTIMIZERS:
            raise UserError(f"unknown optimiser '{self.opt}'; use one of {', '.join(OPTIMIZERS)}")
        config = replace(self, lr=DEFAULT_LR[self.opt] if self.lr is None else self.lr,
                         wd=DEFAULT_WD[self.opt] if self.wd is None else self.wd)
        problems = [f"--{name.replace('_', '-')} {why}" for name, ok, why in (
            ("epochs", config.epochs >= 1, "must be at least 1"),
            ("batch_size", config.batch_size >= 1, "must be at least 1"),
            ("lr", config.lr > 0, "must be positive"),
            ("wd", config.wd >= 0, "must not be negative"),
            ("warmup_epochs", 0 <= config.warmup_epochs <= config.epochs, "must be between 0 and --epochs"),
            ("temperature", config.temperature > 0, "must be positive"),
            ("ce_weight", config.ce_weight >= 0, "must not be negative"),
            ("mixup", config.mixup >= 0, "must not be negative (0 turns mixup off)"),
            ("workers", config.workers >= 0, "must not be negative"),
            ("aug", config.aug in AUGMENTATIONS, f"must be one of {', '.join(AUGMENTATIONS)}"),
            ("verify_shards", config.verify_shards in CHECK_LEVELS, f"must be one of {', '.join(CHECK_LEVELS)}"),
            ("on_bad_shard", config.on_bad_shard in BAD_SHARD_POLICIES,
             f"must be one of {', '.join(BAD_SHARD_POLICIES)}"),
            ("teacher_logits", config.teacher_logits in TEACHER_LOGITS, f"must be one of {', '.join(TEACHER_LOGITS)}"),
            ("amp", config.amp in AMP_MODES, f"must be one of {', '.join(AMP_MODES)}"),
            ("label_smoothing", 0 <= config.label_smoothing < 1, "must be in [0, 1)"),
            ("label_smoothing", config.label_smoothing == 0 or config.ce_weight > 0,
             "smooths the CE term: also pass --ce-weight > 0"),
            ("clip_grad", config.clip_grad >= 0, "must not be negative (0 turns clipping off)"),
            ("ema_decay", 0 <= config.ema_decay < 1, "must be in [0, 1) (0 turns the EMA off)"),
        ) if not ok]
        if config.teacher_logits == "stored" and (config.aug != "none" or config.mixup > 0):
            problems.append(f"--teacher-logits stored trains on the view the logits were computed on, the stored "
                            f"image: pass --aug none --mixup 0 (got --aug {config.aug} --mixup {config.mixup:g}), "
                            "or use --teacher-logits online to augment")
        if problems:
            raise UserError("; ".join(problems))
        return config


# --------------------------------------------------------------------------- loss
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch (Hinton et al. 2015)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def mixup(images: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blend every image with a random partner, each pair with its own lam ~ Beta(alpha, alpha):
    lam * x + (1 - lam) * x[perm]. Returns (mixed images, perm, lam of shape (B,)); alpha = 0: unchanged."""
    n = images.shape[0]
    if alpha <= 0:
        return images, torch.arange(n, device=images.device), torch.ones(n, device=images.device)
    lam = torch.distributions.Beta(alpha, alpha).sample((n,)).to(images.device)
    perm = torch.randperm(n).to(images.device)
    w = lam.view(-1, *([1] * (images.dim() - 1)))
    return w * images + (1 - w) * images[perm], perm, lam


@dataclass
class Models:
    """What a training step runs: `model` (the student, maybe in DDP / compiled) and `student` (the plain
    module: its parameters, spec and state_dict), `teacher` (None with stored logits), and the extras."""

    model: nn.Module
    student: nn.Module
    teacher: nn.Module | None
    teacher_spec: object
    scaler: torch.amp.GradScaler
    ema: ModelEma | None = None


def distill_loss(models: Models, batch: Batch, config: TrainConfig, device: torch.device) -> torch.Tensor:
    """The training loss of one batch: KD against the online teacher on the same (mixed) view, or against
    the stored logits of the stored view, plus CE."""
    images = batch_to(batch.images, device, config.channels_last)
    if models.teacher is None:  # stored logits (resolved() ensures: no augmentation, no mixup)
        n = images.shape[0]
        perm, lam = torch.arange(n, device=device), torch.ones(n, device=device)
        teacher_logits = batch.logits.to(device, non_blocking=True)
    else:
        images, perm, lam = mixup(images, config.mixup)
        with torch.no_grad(), autocast(config.amp, device):
            teacher_logits = models.teacher(models.teacher_spec.normalize(images))
    with autocast(config.amp, device):
        student_logits = models.model(models.student.input_spec.normalize(images))
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    loss = kd_loss(student_logits, teacher_logits, config.temperature)
    if config.ce_weight > 0:
        labels, smoothing = batch.labels.to(device), config.label_smoothing
        ce = (lam * F.cross_entropy(student_logits, labels, reduction="none", label_smoothing=smoothing)
              + (1 - lam) * F.cross_entropy(student_logits, labels[perm], reduction="none",
                                            label_smoothing=smoothing)).mean()
        loss = loss + config.ce_weight * ce
    return loss


# --------------------------------------------------------------------------- models
def load_teacher(manifest: Manifest, weights: str | None, device: torch.device) -> nn.Module:
    """The teacher that made the shards, frozen in eval mode. `weights` None: the manifest's record.
    UserError unless the weights' checksum equals the manifest's."""
    record, spec = manifest.teacher, manifest.input_spec
    if weights is None:
        weights = record.get("weights_path") or record["weights"]
        if record.get("weights_path") and not Path(weights).is_file():
            raise UserError(f"the teacher weights recorded in the manifest, {weights}, are gone: "
                            "pass --teacher-weights PATH to a copy of them")
    seed = int(manifest.config.get("seed", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # synth seeds before building, so a random ('none') teacher can be rebuilt
        teacher = create_model(record["arch"], num_classes=spec.num_classes, weights=weights,
                               in_chans=spec.channels, input_size=spec.size)
    found = state_dict_sha256(teacher)
    if found != record["weights_sha256"] and weights in ("none", "None", ""):
        raise UserError(f"the shards were made by a randomly initialised {record['arch']} (weights 'none') that "
                        f"seed {seed} does not rebuild: pass --teacher-weights PATH to a checkpoint of that teacher")
    if found != record["weights_sha256"]:
        raise UserError(f"the shards were made by another teacher: {record['arch']} weights '{weights}' have sha256 "
                        f"{found[:12]}..., the manifest records {record['weights_sha256'][:12]}...; "
                        "pass --teacher-weights PATH to the weights used by `synth generate`")
    return teacher.eval().requires_grad_(False).to(device)


def build_student(config: TrainConfig, manifest: Manifest) -> nn.Module:
    """The student, shaped for the shards' images and classes (UserError if its weights do not fit)."""
    spec = manifest.input_spec
    try:
        return create_model(config.student, num_classes=manifest.num_classes, weights=config.student_weights,
                            in_chans=spec.channels, input_size=spec.size)
    except CheckpointError:
        raise  # a damaged or malformed file: its own message names it and the fix
    except UserError as e:
        if "unknown model" in e.message:
            raise
        raise UserError(f"student {config.student} with weights '{config.student_weights}' does not fit the shards "
                        f"({spec.channels} x {spec.size} x {spec.size} images, {manifest.num_classes} classes): "
                        f"{e.message}. Pass --student-weights none, or weights made for this input and class "
                        "count") from None


def check_models_fit(teacher: nn.Module | None, student: nn.Module, manifest: Manifest, student_name: str,
                     device: torch.device) -> None:
    """Run teacher (unless None: stored logits) and student once on a batch of the shards' shape, before
    the first step: UserError (saying what to do) for a model that cannot take the input or has another
    number of outputs."""
    spec = manifest.input_spec
    shape = f"{spec.channels} x {spec.size} x {spec.size}"
    images = torch.full((2, spec.channels, spec.size, spec.size), 0.5, device=device)
    for role, model, fix in (
            ("student", student, f"choose a student that takes {spec.size} px input, or regenerate the shards "
                                 "at a size it takes (`synth generate --resolution N`)"),
            ("teacher", teacher, "regenerate the shards with this teacher")):
        if model is None:
            continue
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(model.input_spec.normalize(images))
        except (RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:160]
            name = student_name if role == "student" else manifest.teacher["arch"]
            raise UserError(f"{role} {name} cannot take the shards' {shape} images ({first}); {fix}") from None
        finally:
            model.train(was_training)
        if tuple(logits.shape) != (2, manifest.num_classes):
            raise UserError(f"{role} outputs {tuple(logits.shape)[1:]} per image, the shards have "
                            f"{manifest.num_classes} classes; {fix}")


# --------------------------------------------------------------------------- shards
def select_shards(config: TrainConfig, manifest: Manifest, log,
                  bad: dict[str, str] | None = None) -> tuple[Manifest, dict[str, str]]:
    """Check the shard files against the manifest before the first step (`config.verify_shards`; or take
    `bad`, the verdict of rank 0's check). Returns the manifest of the shards to train on and {skipped
    shard: why}. With on_bad_shard 'error' any damaged shard is a UserError; with 'skip' it is left out,
    counted and reported."""
    if bad is None:
        bad = check_shard_files(config.shards, manifest, config.verify_shards)
    if not bad:
        return manifest, {}
    listing = "; ".join(f"{name}: {why}" for name, why in list(bad.items())[:3]) + ("; ..." if len(bad) > 3 else "")
    if config.on_bad_shard == "error":
        raise UserError(f"{len(bad)} of {len(manifest.shards)} shards in {config.shards} do not match the manifest "
                        f"({listing}): rerun the same `synth generate` to redo them (`synth verify {config.shards}` "
                        "lists them), or pass --on-bad-shard skip to train without them")
    kept = [s for s in manifest.shards if s.name not in bad]
    if not kept:
        raise UserError(f"all {len(bad)} shards in {config.shards} are damaged ({listing}); regenerate them")
    lost = sum(s.num_samples for s in manifest.shards if s.name in bad)
    log(f"warning: skipping {len(bad)} of {len(manifest.shards)} shards ({lost} of {manifest.num_samples} samples) "
        f"that do not match the manifest (--on-bad-shard skip): {listing}")
    return replace(manifest, shards=kept, planned_samples=manifest.planned_samples - lost), bad


# --------------------------------------------------------------------------- run folder
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


def make_out(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out} ({e.strerror}); choose a writable folder") from None
    return out


def check_started_run(out: Path, config: TrainConfig) -> None:
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
    current, defaults = asdict(config), setting_defaults()
    changed = [f"{k} {saved.get(k, defaults.get(k))!r} -> {v!r}" for k, v in current.items()
               if k not in RESUMABLE_CHANGES and saved.get(k, defaults.get(k)) != v]
    if changed:
        raise UserError(f"{out} holds the start of another run ({path.name} differs: {', '.join(changed[:4])}) "
                        "without a checkpoint: choose another --out, or delete that folder to start over")


def setting_defaults() -> dict:
    """TrainConfig's defaults: the value of a setting added after a checkpoint or config.json was written."""
    return {f.name: f.default for f in fields(TrainConfig)}


def run_fingerprint(config: TrainConfig, manifest: Manifest, teacher_sha256: str, world_size: int = 1) -> dict:
    """What a checkpoint must agree on to be resumed: run settings, shard checksums, teacher weights and
    the number of processes (it sets the data split and the steps per epoch)."""
    settings = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    return {"settings": settings, "shards": [s.sha256 for s in manifest.shards], "teacher_sha256": teacher_sha256,
            "world_size": world_size}


def rng_states() -> dict:
    """This process's RNG states (CPU, and its CUDA device's)."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def save_checkpoint(path: Path, models: Models, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, history: list[dict],
                    config: TrainConfig, fingerprint: dict, step_log: list[dict] | None = None,
                    rank_rngs: list[dict] | None = None) -> None:
    """Everything needed to continue after `epoch` completed epochs, written atomically (temp, fsync,
    rename: a kill or a full disk leaves the previous checkpoint in place). `rank_rngs`: every rank's
    `rng_states()` (in a distributed run)."""
    state = {
        "epoch": epoch, "student": models.student.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "history": history, "config": asdict(config),
        "fingerprint": fingerprint, "step_log": step_log or [],
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    if rank_rngs is not None:
        state["rng"]["ranks"] = rank_rngs
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
        saved_settings, saved_shards, saved_teacher = saved["settings"], saved["shards"], saved["teacher_sha256"]
        int(state["epoch"]), list(state["history"]), state["student"], state["rng"]["torch"]  # noqa: B018
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} is not a `distill train` checkpoint; {fix}") from None
    defaults = setting_defaults()  # settings added since the checkpoint was written
    changed = [f"{k} {saved_settings.get(k, defaults.get(k))!r} -> {v!r}" for k, v in fingerprint["settings"].items()
               if saved_settings.get(k, defaults.get(k)) != v]
    if changed:
        raise UserError(f"{path} belongs to a run with other settings ({', '.join(changed)}): resume with the "
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


def write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    with atomic_open(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_metrics(path: Path, history: list[dict]) -> None:
    write_csv(path, METRICS_COLUMNS + ((EMA_COLUMN,) if history and EMA_COLUMN in history[0] else ()), history)


class NonFiniteLoss(ArithmeticError):
    """The loss (or the weights) stopped being finite numbers."""


def check_finite_weights(model: nn.Module) -> None:
    """NonFiniteLoss if any parameter holds NaN or Inf (never checkpoint such a model)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteLoss(f"parameter {name} holds NaN/Inf after the last step")


# --------------------------------------------------------------------------- training
def train_one_epoch(models: Models, loader: ShardLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig, epoch: int,
                    device: torch.device, step_log: list[dict] | None = None, show: bool = True) -> dict:
    """One pass of `len(loader)` steps. Returns train_loss (this rank's mean), lr (of the last step),
    seconds. Appends the mean loss and the lr of about LOG_POINTS_PER_EPOCH windows to `step_log`.
    NonFiniteLoss as soon as a step's loss is NaN or Inf."""
    models.model.train()
    start = time.perf_counter()
    total_loss, lr = 0.0, 0.0
    window, window_loss = max(1, len(loader) // LOG_POINTS_PER_EPOCH), 0.0
    parameters = list(models.student.parameters())
    with tqdm(loader.epoch(epoch), total=len(loader), desc=f"epoch {epoch + 1}/{config.epochs}",
              disable=not (config.progress and show), leave=False) as bar:
        for i, batch in enumerate(bar):
            loss = distill_loss(models, batch, config, device)
            optimizer.zero_grad(set_to_none=True)
            models.scaler.scale(loss).backward()
            if config.clip_grad > 0:
                models.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, config.clip_grad)
            models.scaler.step(optimizer)
            models.scaler.update()
            if models.ema is not None:
                models.ema.update(models.student)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLoss(f"the loss is {value} at step {i + 1} of the epoch")
            total_loss += value
            window_loss += value
            if step_log is not None and ((i + 1) % window == 0 or i + 1 == len(loader)):
                count = (i % window) + 1
                step_log.append({"epoch": epoch + 1, "step": epoch * len(loader) + i + 1, "lr": lr,
                                 "train_loss": window_loss / count})
                window_loss = 0.0
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            fault_point("train-step")
    return {"train_loss": total_loss / len(loader), "lr": lr, "seconds": time.perf_counter() - start}


@dataclass
class RunInputs:
    """Everything a run reads, built and checked before its folder is touched."""

    manifest: Manifest              # of the shards trained on (skipped ones left out)
    skipped: dict[str, str]         # shard name -> why it was left out (--on-bad-shard skip)
    device: torch.device
    teacher: nn.Module | None       # None: stored logits
    student: nn.Module
    loader: ShardLoader
    eval_student: object = None     # real evaluation data in each model's input space, or None (and on ranks > 0)
    eval_teacher: object = None


def prepare_inputs(config: TrainConfig, device: torch.device,
                   dist: distributed.DistInfo = distributed.DistInfo()) -> RunInputs:
    """Read and check the shards, models and evaluation data (UserError before any file is written).
    In a distributed run rank 0 checks the shard files and the others take its verdict."""
    manifest = read_manifest(config.shards)
    bad = None
    if dist.enabled:
        bad = check_shard_files(config.shards, manifest, config.verify_shards) if dist.is_main else None
        bad = distributed.broadcast_object(bad)
    manifest, skipped = select_shards(config, manifest, _warn if dist.is_main else (lambda message: None), bad)
    torch.manual_seed(config.seed)
    teacher = None if config.teacher_logits == "stored" else load_teacher(manifest, config.teacher_weights, device)
    student = to_memory_format(build_student(config, manifest).to(device), config.channels_last)
    check_models_fit(teacher, student, manifest, config.student, device)
    if dist.enabled:  # the same initial weights everywhere (DDP also broadcasts rank 0's); then own draws
        torch.manual_seed(config.seed + dist.rank)
    loader = ShardLoader(config.shards, manifest, config.batch_size, config.workers, config.aug, config.seed,
                         rank=dist.rank, world_size=dist.world_size, skip_bad=config.on_bad_shard == "skip",
                         pin_memory=config.pin_memory and device.type == "cuda",
                         persistent_workers=config.persistent_workers, verify=config.verify_shards)
    inputs = RunInputs(manifest, skipped, device, teacher, student, loader)
    if config.eval_data and dist.is_main:  # an ImageFolder is decoded once here: a damaged image stops the run now
        inputs.eval_student = real_dataset(config.eval_data, student.input_spec, train=False, root=config.data_root,
                                           workers=config.workers)
        if teacher is not None:
            inputs.eval_teacher = inputs.eval_student if teacher.input_spec == student.input_spec else real_dataset(
                config.eval_data, teacher.input_spec, train=False, root=config.data_root, check=False,
                workers=config.workers)  # streamed: checked above; cached at the teacher's size: decoded here
    return inputs


def train(config: TrainConfig) -> dict:
    """Distill `config.student` from the shards' teacher. Returns the final metrics: eval_top1 (None
    without eval data, and on ranks other than 0), teacher_top1, epochs, steps, train_loss (mean over
    ranks), images_per_s (all ranks together), skipped_shards, out. Everything that can be checked is
    checked before the run folder is created. Under torchrun every rank calls this."""
    config = config.resolved()
    out = check_out(config)
    device = distributed.device_for(resolve_device(config.device))
    check_amp(config.amp, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with distributed.process_group(distributed.backend_for(device)) as dist:
        inputs = prepare_inputs(config, device, dist)
        if not dist.is_main:  # rank 0 makes, locks and cleans the run folder; the others wait for it
            distributed.barrier()
            return _train(config, out, inputs, dist)
        with folder_lock(make_out(out), "distill train"):
            remove_stale_temps(out)
            distributed.barrier()
            try:
                return _train(config, out, inputs, dist)
            except DiskFullError as e:
                raise e.with_fix("make room (free space, or raise the quota or limit) and rerun with --resume: "
                                 "the run continues from its last checkpoint") from None


def _warn(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _train(config: TrainConfig, out: Path, inputs: RunInputs,
           dist: distributed.DistInfo = distributed.DistInfo()) -> dict:
    """The run itself, once the inputs are checked and the run folder is locked (by rank 0)."""
    manifest, device, teacher, student, loader = (inputs.manifest, inputs.device, inputs.teacher, inputs.student,
                                                  inputs.loader)
    eval_student, eval_teacher = inputs.eval_student, inputs.eval_teacher
    main = dist.is_main
    optimizer = build_optimizer(student, config.opt, config.lr, config.wd)
    scheduler = warmup_cosine(optimizer, config.epochs * len(loader), round(config.warmup_epochs * len(loader)))
    models = Models(model=student, student=student, teacher=teacher,
                    teacher_spec=teacher.input_spec if teacher is not None else None,
                    scaler=grad_scaler(config.amp, device),
                    ema=ModelEma(student, config.ema_decay) if config.ema_decay > 0 else None)

    fingerprint = run_fingerprint(config, manifest, manifest.teacher["weights_sha256"], dist.world_size)
    log = tqdm.write if config.progress and main else (lambda message: None)
    history, step_log, start_epoch = [], [], 0
    if config.resume and (out / CHECKPOINT_FILE).is_file():
        state = load_checkpoint(out / CHECKPOINT_FILE, fingerprint)
        restore(state, models, optimizer, scheduler, out / CHECKPOINT_FILE, dist.rank)
        history, step_log, start_epoch = state["history"], list(state.get("step_log", [])), state["epoch"]
    elif config.resume:
        log(f"no checkpoint in {out} yet: starting at epoch 1")
    models.model = wrap_student(student, device, dist.enabled, config.compile)
    if teacher is not None:
        models.teacher = wrap_teacher(to_memory_format(teacher, config.channels_last), config.compile)
    if main:
        write_json_atomic(out / CONFIG_FILE, asdict(config) | {"world_size": dist.world_size})
    try:
        teacher_top1 = None if eval_teacher is None else evaluate_top1(teacher, eval_teacher, device, config.workers)
    except OSError as e:  # an evaluation image damaged since the check (nothing trained yet)
        raise UserError(f"evaluating the teacher on {config.eval_data} failed ({unreadable_reason(e)}): replace or "
                        "remove that file, then rerun") from None
    if history and history[-1]["eval_top1"] is None and eval_student is not None:
        # the last finished epoch was not evaluated (its evaluation failed, or --eval-data is new): do it now
        history[-1]["eval_top1"] = evaluate_student(student, eval_student, device, config, out)
        if models.ema is not None:
            history[-1][EMA_COLUMN] = evaluate_student(models.ema.module, eval_student, device, config, out)
        if main:
            save_checkpoint(out / CHECKPOINT_FILE, models, optimizer, scheduler, start_epoch, history, config,
                            fingerprint, step_log, state["rng"].get("ranks"))
            write_metrics(out / METRICS_FILE, history)
            log(f"epoch {start_epoch}: top-1 {history[-1]['eval_top1']:.2f}% (evaluated on resuming)")
    if teacher_top1 is not None:
        log(f"teacher top-1 on {config.eval_data}: {teacher_top1:.2f}%")
    if dist.enabled:
        log(f"{dist.world_size} processes ({distributed.backend_for(device)}), {len(loader)} steps of "
            f"{dist.world_size} x {config.batch_size} images per epoch")

    for epoch in range(start_epoch, config.epochs):
        try:
            with torch.autograd.set_detect_anomaly(config.detect_anomaly):
                stats = train_one_epoch(models, loader, optimizer, scheduler, config, epoch, device, step_log,
                                        show=main)
            check_finite_weights(student)
        except ShardFormatError as e:
            # from a DataLoader worker the message carries the worker's traceback: keep its last line
            reason = str(e).strip().splitlines()[-1].split("ShardFormatError: ", 1)[-1]
            raise UserError(f"bad shard data in {config.shards}: {reason}; check the folder with "
                            f"`synth verify {config.shards}`") from None
        except NonFiniteLoss as e:
            raise diverged(out, epoch, str(e)) from None
        except RuntimeError as e:
            if config.detect_anomaly and "nan" in str(e).lower():
                raise diverged(out, epoch, str(e).strip().splitlines()[0][:200]) from None
            raise
        train_loss = distributed.all_reduce_mean(stats["train_loss"], device)
        rank_rngs = distributed.all_gather_object(rng_states()) if dist.enabled else None
        top1 = ema_top1 = eval_failed = None
        try:  # a failed evaluation must not lose the epoch: it is checkpointed first, then reported
            if eval_student is not None:
                top1 = evaluate_top1(student, eval_student, device, config.workers)
                if models.ema is not None:
                    ema_top1 = evaluate_top1(models.ema.module, eval_student, device, config.workers)
        except Exception as e:  # noqa: BLE001 (re-raised below, after the checkpoint)
            top1 = ema_top1 = None
            eval_failed = e
        images = len(loader) * config.batch_size * dist.world_size
        row = {"epoch": epoch + 1, "step": (epoch + 1) * len(loader), "lr": stats["lr"], "train_loss": train_loss,
               "eval_top1": top1, "seconds": stats["seconds"], "images_per_s": images / stats["seconds"]}
        if models.ema is not None:
            row[EMA_COLUMN] = ema_top1
        history.append(row)
        if not main:
            continue
        save_checkpoint(out / CHECKPOINT_FILE, models, optimizer, scheduler, epoch + 1, history, config, fingerprint,
                        step_log, rank_rngs)
        fault_point("epoch-saved")
        write_metrics(out / METRICS_FILE, history)
        write_csv(out / STEPS_FILE, STEPS_COLUMNS, step_log)
        if eval_failed is not None:
            if not isinstance(eval_failed, OSError):
                raise eval_failed
            reason = unreadable_reason(eval_failed)
            raise UserError(f"evaluating epoch {epoch + 1} on {config.eval_data} failed ({reason}); the epoch "
                            f"is saved in {out / CHECKPOINT_FILE} with its top-1 left empty: replace or "
                            "remove that file and rerun with --resume, which evaluates it first") from None
        log(f"epoch {epoch + 1}/{config.epochs}: loss {train_loss:.4f}"
            + (f", top-1 {top1:.2f}%" if top1 is not None else "")
            + (f", EMA top-1 {row[EMA_COLUMN]:.2f}%" if row.get(EMA_COLUMN) is not None else "")
            + f", {images / stats['seconds']:.0f} img/s")

    final = history[-1]
    if main:
        shards = config.shards if is_remote(config.shards) else str(Path(config.shards).resolve())
        extra = {"teacher_sha256": fingerprint["teacher_sha256"], "shards": shards,
                 "epochs": final["epoch"], "eval_top1": final["eval_top1"]}
        save_model_checkpoint(out / STUDENT_FILE, student, extra=extra)
        if models.ema is not None:
            save_model_checkpoint(out / EMA_FILE, models.ema.module, extra=extra | {"eval_top1": final.get(EMA_COLUMN)})
    distributed.barrier()  # rank 0 has written everything
    seconds = sum(row["seconds"] for row in history)
    return {"eval_top1": final["eval_top1"], "teacher_top1": teacher_top1, "epochs": final["epoch"],
            "steps": final["step"], "train_loss": final["train_loss"],
            "images_per_s": final["step"] * config.batch_size * dist.world_size / seconds,
            "skipped_shards": len(inputs.skipped), "out": str(out)}


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
