"""The settings of a `distill train` run: TrainConfig, its defaults and its validation (`resolved`)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from common.errors import UserError
from common.shards import CHECK_LEVELS

from .data import AUGMENTATIONS
from .engine import OPTIMIZERS
from .losses import LOSSES
from .throughput import AMP_MODES

DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}
DEFAULT_WD = {"sgd": 5e-4, "adamw": 0.05}
TEACHER_LOGITS = ("online", "stored")
BAD_SHARD_POLICIES = ("error", "skip")
# Settings that may change when resuming: paths (the shards and the teacher are checked by checksum
# instead), evaluation and how the run is executed. Everything else must match the checkpoint.
RESUMABLE_CHANGES = ("shards", "out", "teacher_weights", "eval_data", "data_root", "device",
                     "resume", "progress", "verify_shards", "on_bad_shard", "detect_anomaly",
                     "channels_last", "compile", "pin_memory")
# Settings that do not change the student's recipe but the order of the samples or the augmentation draws
# (the shards are split among the DataLoader workers; persistent workers keep their RNG across epochs):
# they too must match on resume, and the refusal says why.
ORDER_CHANGES = ("workers", "persistent_workers", "seed")


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
    batch_size_per_rank: int = 128      # images per process per step (torchrun: global batch = this x ranks)
    opt: str = "sgd"
    lr: float | None = None
    wd: float | None = None
    warmup_epochs: float = 1.0
    # distillation
    loss: str = "kd"                    # the training loss, by name in LOSSES (distill/losses.py)
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
            ("batch_size_per_rank", config.batch_size_per_rank >= 1, "must be at least 1"),
            ("lr", config.lr > 0, "must be positive"),
            ("wd", config.wd >= 0, "must not be negative"),
            ("warmup_epochs", 0 <= config.warmup_epochs <= config.epochs, "must be between 0 and --epochs"),
            ("temperature", config.temperature > 0, "must be positive"),
            ("ce_weight", config.ce_weight >= 0, "must not be negative"),
            ("mixup", config.mixup >= 0, "must not be negative (0 turns mixup off)"),
            ("workers", config.workers >= 0, "must not be negative"),
            ("loss", config.loss in LOSSES, f"must be one of {', '.join(LOSSES)}"),
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


RENAMED = {"batch_size": "batch_size_per_rank"}  # old setting name -> new, in checkpoints and config.json


def renamed(settings: dict) -> dict:
    """Settings recorded by an older version, under today's names."""
    return {RENAMED.get(k, k): v for k, v in settings.items()}


def setting_defaults() -> dict:
    """TrainConfig's defaults: the value of a setting added after a checkpoint or config.json was written."""
    return {f.name: f.default for f in fields(TrainConfig)}

