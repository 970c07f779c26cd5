"""The settings of a `distill train` run: TrainConfig, its defaults and its validation (`resolved`)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from common.errors import UserError
from common.options import option, options_of, resumable
from common.shards import CHECK_LEVELS

from .data import AUGMENTATIONS
from .engine import OPTIMIZERS
from .losses import LOSSES
from .throughput import AMP_MODES

DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}
DEFAULT_WD = {"sgd": 5e-4, "adamw": 0.05}
TEACHER_LOGITS = ("online", "stored")
BAD_SHARD_POLICIES = ("error", "skip")
@dataclass
class TrainConfig:
    """A distillation run. `lr`/`wd` of None take the optimiser's default (DEFAULT_LR, DEFAULT_WD)."""

    shards: str = option(help="Folder written by `synth generate`.", effect="none", cli=False)
    student: str = option(help="Student model, by registry name.", cli=False)
    out: str = option(help="Run folder.", effect="none", cli=False)
    teacher_weights: str | None = option(None, help="Teacher weights; none: the weights recorded in the manifest.",
                                         effect="none")
    student_weights: str = option("none", help="Initial student weights: none, DEFAULT or a checkpoint path.")
    # optimisation
    epochs: int = option(10, help="Training epochs.", min=1)
    batch_size_per_rank: int = option(128, help="Images per process per step (torchrun: global batch = this x ranks).",
                                      min=1)
    opt: str = option("sgd", help="Optimiser.", choices=tuple(OPTIMIZERS))
    lr: float | None = option(None, help="Learning rate; none: the optimiser's default (sgd 0.1, adamw 1e-3).")
    wd: float | None = option(None, help="Weight decay; none: the optimiser's default (sgd 5e-4, adamw 0.05).",
                              min=0)
    warmup_epochs: float = option(1.0, help="Linear warm-up of the learning rate, in epochs.", min=0)
    # distillation
    loss: str = option("kd", help="The training loss, by name in LOSSES (distill/losses.py).", choices=tuple(LOSSES))
    temperature: float = option(4.0, help="Distillation temperature.")
    ce_weight: float = option(0.0, help="Weight of the cross-entropy term on the teacher's argmax.", min=0)
    mixup: float = option(0.0, help="Beta(alpha, alpha) mixing of image pairs; 0 = off.", min=0)
    aug: str = option("translate", help="Augmentation of the student's view.", choices=tuple(AUGMENTATIONS))
    # execution and evaluation
    workers: int = option(2, help="DataLoader worker processes (the shards are split among them).", min=0,
                          effect="order")
    eval_data: str | None = option(None, help='Evaluation data: "mnist" or an ImageFolder path.', effect="none")
    data_root: str = option("data", help="Where torchvision datasets are downloaded.", effect="none")
    seed: int = option(0, help="Random seed (sample order, augmentation draws).", effect="order")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N.", effect="none")
    resume: bool = option(False, help="Continue the run in `out` from its checkpoint (if it has one).", effect="none")
    progress: bool = option(True, help="Show a progress bar.", effect="none")
    # faults
    verify_shards: str = option("full", help="Before the first step: full (size + sha256), size, none.",
                                choices=tuple(CHECK_LEVELS), effect="none")
    on_bad_shard: str = option("error", help="A shard that does not match the manifest: error, or skip it.",
                               choices=BAD_SHARD_POLICIES, effect="none")
    detect_anomaly: bool = option(False, help="torch.autograd anomaly detection (slow): names the op making NaN.",
                                  effect="none")
    # stored teacher logits, regularisation (change results; off by default)
    teacher_logits: str = option("online", help="online: the teacher labels the student's view; stored: the "
                                 "shards' logits.", choices=TEACHER_LOGITS)
    label_smoothing: float = option(0.0, help="Label smoothing of the CE term (needs --ce-weight > 0).", min=0)
    clip_grad: float = option(0.0, help="Max global gradient norm; 0 = off.", min=0)
    ema_decay: float = option(0.0, help="EMA of the student's weights, per step (e.g. 0.999); 0 = off.", min=0)
    amp: str = option("none", help="none, bf16 (CPU/GPU autocast), fp16 (GPU, GradScaler).", choices=tuple(AMP_MODES))
    # speed only
    channels_last: bool = option(False, help="channels_last memory format.", effect="none")
    compile: bool = option(False, help="torch.compile student and teacher.", effect="none")
    pin_memory: bool = option(False, help="Page-locked batches (CUDA only; ignored on the CPU).", effect="none")
    persistent_workers: bool = option(False, help="Keep DataLoader workers alive between epochs.", effect="order")

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


# Settings that may change when resuming (effect "none": paths checked by checksum, evaluation, execution),
# and those that change the order of the samples or the augmentation draws (effect "order"): refused on
# resume with their own message. Both derived from the declarations above.
RESUMABLE_CHANGES = tuple(sorted(resumable(TrainConfig)))
ORDER_CHANGES = tuple(s.name for s in options_of(TrainConfig) if s.effect == "order")


RENAMED = {"batch_size": "batch_size_per_rank"}  # old setting name -> new, in checkpoints and config.json


def renamed(settings: dict) -> dict:
    """Settings recorded by an older version, under today's names."""
    return {RENAMED.get(k, k): v for k, v in settings.items()}


def setting_defaults() -> dict:
    """TrainConfig's defaults: the value of a setting added after a checkpoint or config.json was written."""
    return {f.name: f.default for f in fields(TrainConfig)}

