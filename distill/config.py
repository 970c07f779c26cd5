"""The settings of a `distill train` run: TrainConfig, its defaults, its validation (`resolved`), its
last step of resolution (`settle`) and what differs from a recorded run (`changed_settings`). The options
of the chosen loss are declared by the loss (distill/losses/) and travel beside TrainConfig: as given in
`loss_options`, resolved in the recipe's Resolved.plugin, flat beside TrainConfig's in the checkpoint's
fingerprint and in config.json."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from dfkd.common.accel import AMP_MODES
from dfkd.common.errors import UserError
from dfkd.common.options import (Change, below_one, differences, hashed, one_of, option, options_of, positive,
                                track_explicit, validate)
from dfkd.common.recipes import AUTO, shipped_names
from dfkd.common.shards import CHECK_LEVELS

from .augment import AUGMENTATIONS, described
from .engine import OPTIMIZERS
from .losses import LOSSES
from .stopping import settle_stop_rule
from .validation import KEEP

DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}
DEFAULT_WD = {"sgd": 5e-4, "adamw": 0.05}
TEACHER_LOGITS = ("online", "stored")
TEACHER_VIEWS = ("stored", "native")
BAD_SHARD_POLICIES = ("error", "skip")


# with --teacher-logits stored the student trains on the view the logits were computed on: these values,
# unless the caller gave others (then TrainConfig.resolved() says why they cannot be)
_STORED_VIEW = {"aug": "none", "mixup": 0.0, "cutmix": 0.0}


@track_explicit
@dataclass
class TrainConfig:
    """A distillation run, each option declared once (common/options.py): the `distill train` flags, their
    help, checks, the resume rules and the checkpoint fingerprint come from here. Fields the caller does
    not give come from the recipe (`recipe`, default auto: common.recipes.resolve_recipe), else from these defaults.
    `lr`/`wd` of None take the optimiser's default (DEFAULT_LR, DEFAULT_WD)."""

    # the subjects of `distill train --help`, in its order; every command-line option names one (group=)
    HELP_GROUPS = ("Input and output", "Teacher", "Optimisation", "Loss and regularisation", "Evaluation",
                   "Resume and faults", "Execution")
    RECIPE_TABLE = "distill"   # the recipe's table of these options; the losses': [distill.loss.<name>]
    PLUGINS = LOSSES

    shards: str = option(group="Input and output", effect="none", recipe=False,
                         help="Folder written by `synth generate` (shards + manifest.json): a path, an http(s):// "
                         "URL, or a pipe: command with {name} for the file name (e.g. 'pipe:aws s3 cp "
                         "s3://b/shards/{name} -').")
    student: str = option(group="Input and output",
                          help="Student model name (e.g. lenet5_half, resnet18, timm/resnet18, my_pkg.nets:build).")
    out: str = option(group="Input and output", effect="none", recipe=False,
                      help="Run folder: config.json, checkpoint.pt, metrics.csv, student.pt.")
    recipe: str = option(AUTO, group="Input and output", effect="none", recipe=False,
                         help="Settings to start from: a shipped recipe (" + ", ".join(shipped_names()) + "), a "
                         ".toml file (its [distill] table), auto (the recipe the shards were made with, else the "
                         "one chosen from the teacher's input) or none (the declared defaults). Explicit flags "
                         "override it.")
    teacher_weights: str | None = option(None, group="Teacher", effect="none",
                                         help="Teacher checkpoint; none: the weights recorded in the manifest "
                                         "(checked by sha256).")
    student_weights: str = option("none", help="Initial student weights: none, DEFAULT (torchvision) or a "
                                  "checkpoint path.", group="Input and output")
    # optimisation
    epochs: int = option(10, group="Optimisation", help="Training epochs.", min=1)
    batch_size_per_rank: int = option(128, min=1, help="Images per process per step; under torchrun the global "
                                      "batch is this x the number of processes.", group="Optimisation")
    opt: str = option("sgd", group="Optimisation",
                      help="Optimiser: SGD (momentum 0.9, Nesterov) or AdamW.", choices=tuple(OPTIMIZERS))
    lr: float | None = option(None, check=positive, help=f"Peak learning rate; none: the optimiser's default "
                              f"({DEFAULT_LR['sgd']} for sgd, {DEFAULT_LR['adamw']} for adamw).", group="Optimisation")
    wd: float | None = option(None, min=0, help=f"Weight decay; none: the optimiser's default ({DEFAULT_WD['sgd']} "
                              f"for sgd, {DEFAULT_WD['adamw']} for adamw).", group="Optimisation")
    warmup_epochs: float = option(1.0, help="Linear warm-up of the learning rate, in epochs; then cosine decay "
                                  "per step.", min=0, group="Optimisation")
    stop_patience: int = option(0, min=0, group="Optimisation",
                                help="Stop on the held-out KL (val_kl; needs the held-out split, --val-shards): once "
                                "the best val_kl of the last N epochs is not --stop-min-delta below the best before "
                                "them, the learning rate anneals to 0 over a cool-down (--stop-cooldown) and the run "
                                "ends; --epochs is the cap. 0 = the fixed schedule of --epochs.")
    stop_min_delta: float = option(0.05, min=0, group="Optimisation",
                                   help="The relative fall of the held-out KL that counts as an improvement for "
                                   "--stop-patience (0.05: 5% below the best before).")
    stop_cooldown: float = option(0.2, check=positive, max=1, group="Optimisation",
                                  help="The cool-down after --stop-patience triggers, as a fraction of the epochs run "
                                  "so far (at least 1 epoch, at most what is left of --epochs).")
    # distillation
    loss: str = option("kd", check=one_of(LOSSES), help="Training loss by name (distill/losses/: "
                       + ", ".join(LOSSES) + "); each of its terms is logged as loss_<name> in steps.csv and "
                       "metrics.csv.", group="Loss and regularisation")
    loss_options: dict = option(default_factory=dict, cli=False, effect="none",
                                help="Options of the loss (its flags, e.g. --temperature), over the recipe's "
                                "[distill.loss.<name>] table; hashed as the loss's own options.")
    mixup: float = option(0.0, min=0, help="Mixup Beta(alpha, alpha) of image pairs, labelled by the online "
                          "teacher; 0 = off.", group="Loss and regularisation")
    cutmix: float = option(0.0, min=0, help="CutMix Beta(alpha, alpha): a box of a partner image pasted into each "
                           "image, labelled by the online teacher; 0 = off. With --mixup too, each batch takes one of "
                           "the two at random (p 0.5).", group="Loss and regularisation")
    aug: str = option("translate", group="Loss and regularisation", check=one_of(AUGMENTATIONS),
                      help="Student-side augmentation: " + described() + ".")
    # execution and evaluation
    workers: int = option(2, group="Execution", min=0, effect="order",
                          help="DataLoader workers reading shards (needs at least as many shards).")
    eval_data: str | None = option(None, group="Evaluation", effect="none",
                                   help="Real held-out set for top-1: mnist, mnistm, mnistm64, cifar10, cifar100, svhn, stl10 "
                                   "(their test split), imagenet or a train/val folder (its val/), or an ImageFolder "
                                   "path; none: no evaluation.")
    data_root: str = option("data", group="Evaluation", effect="none",
                            help="Where the datasets by name live (or are fetched to).")
    val_shards: str = option("auto", group="Evaluation", effect="none",
                             help="Held-out synthetic shards of the same teacher (never real data): each epoch logs "
                             "the student's agreement with the teacher's stored logits (val_agreement, %) and "
                             "KL(teacher || student) at T = 1 (val_kl) on them; auto: the val/ split `synth "
                             "generate` writes beside --shards, if there is one; none: off. May change on resume, "
                             "except with --keep best-val or --stop-patience.")
    keep: str = option("last", group="Evaluation", choices=KEEP,
                       help="Students saved besides the final student.pt: last (none), best-val (also "
                       "student_best_val.pt, the epoch with the highest val_agreement, ties broken by the lower "
                       "val_kl; needs --val-shards).")
    seed: int = option(0, group="Execution", help="Random seed (sample order, augmentation draws).", effect="order")
    device: str = option("auto", group="Execution", help="auto, cpu, cuda or cuda:N.", effect="none")
    resume: bool = option(False, group="Resume and faults", effect="none", recipe=False,
                          help="Continue the run in --out from its last checkpoint (starts it when there is none yet).")
    progress: bool = option(True, help="Progress bars and per-epoch lines.", effect="none", cli=False)
    # faults
    verify_shards: str = option("full", group="Resume and faults", choices=tuple(CHECK_LEVELS), effect="none",
                                help="Before the first step, check every shard file against the manifest: full "
                                "(size and sha256), size (fast), none (no check: a changed byte that still "
                                "decodes is trained on).")
    on_bad_shard: str = option("error", group="Resume and faults", choices=BAD_SHARD_POLICIES, effect="none",
                               help="A shard that is missing or does not match the manifest: stop with an error, or "
                               "skip it (counted and reported).")
    shard_attempts: int = option(6, group="Resume and faults", min=1, effect="none",
                                 help="Tries per remote shard, the first included: a transfer that fails or is cut "
                                 "short (dropped connection, HTTP 408/429/5xx, read timeout) is fetched again from "
                                 "its start after 1, 2, 4, ... s (at most 60); bytes that arrive whole but differ "
                                 "from the manifest are not retried.")
    shard_retry_seconds: float = option(600.0, group="Resume and faults", min=0, effect="none",
                                        help="No new try of a remote shard starts later than this many seconds after "
                                        "its first; then the shard is bad (--on-bad-shard).")
    shard_read_timeout: float = option(60.0, group="Resume and faults", min=0.1, effect="none",
                                       help="An http(s) shard read that receives no byte for this many seconds fails "
                                       "(and is tried again).")
    detect_anomaly: bool = option(False, group="Resume and faults", effect="none",
                                  help="torch.autograd anomaly detection (slow): names the operation that made a NaN.")
    # stored teacher logits, regularisation (change results; off by default)
    teacher_logits: str = option("online", group="Teacher", choices=TEACHER_LOGITS,
                                 help="online: the teacher labels the student's augmented view; stored: the logits "
                                 "in the shards (no teacher in memory; the student sees the stored view: --aug none "
                                 "and --mixup 0 unless given, other values are refused).")
    teacher_view: str = option("stored", group="Teacher", choices=TEACHER_VIEWS,
                               help="What the online teacher sees: stored (the student's view), or native: each "
                               "image at the resolution its metadata records, downsampled (area) from the "
                               "student's view (a mixed pair at the larger of its two); for shards whose teacher "
                               "saw native sizes in synthesis (MUSE with teacher_input=native).")
    clip_grad: float = option(0.0, group="Optimisation", min=0,
                              help="Clip the gradients' global norm to this; 0 = off.")
    ema_decay: float = option(0.0, min=0, check=below_one, help="Keep an EMA of the student's weights (per step, "
                              "e.g. 0.999), evaluated and saved too; 0 = off.", group="Loss and regularisation")
    amp: str = option("none", group="Execution", choices=tuple(AMP_MODES),
                      help="Mixed precision: bf16 autocast (CPU or GPU), fp16 autocast + GradScaler (GPU).")
    # speed only
    channels_last: bool = option(False, group="Execution",
                                 help="NHWC memory layout for models and batches.", effect="none")
    compile: bool = option(False, group="Execution",
                           help="torch.compile the student (after DDP) and the teacher.", effect="none")
    pin_memory: bool = option(False, group="Execution", effect="none",
                              help="Page-locked batches for faster host-to-GPU copies (CUDA only; ignored on the CPU).")
    persistent_workers: bool = option(False, group="Execution",
                                      help="Keep DataLoader workers alive between epochs.", effect="order")

    def resolved(self) -> "TrainConfig":
        """This config with the optimiser defaults filled in; UserError for a value outside its declaration
        (common.options.validate) or a combination of values that does not work together."""
        config = self if self.opt not in OPTIMIZERS else replace(
            self, lr=DEFAULT_LR[self.opt] if self.lr is None else self.lr,
            wd=DEFAULT_WD[self.opt] if self.wd is None else self.wd)
        validate(config)
        problems = []
        if config.warmup_epochs > config.epochs:
            problems.append(f"--warmup-epochs must not exceed --epochs (got {config.warmup_epochs:g} > "
                            f"{config.epochs})")
        if config.teacher_logits == "stored" and (config.aug != "none" or config.mixup > 0 or config.cutmix > 0):
            problems.append(f"--teacher-logits stored trains on the view the logits were computed on, the stored "
                            f"image: pass --aug none --mixup 0 --cutmix 0 (got --aug {config.aug} --mixup "
                            f"{config.mixup:g} --cutmix {config.cutmix:g}), or use --teacher-logits online to augment")
        if config.teacher_logits == "stored" and config.teacher_view != "stored":
            problems.append("--teacher-view native re-labels each batch with the online teacher: it needs "
                            "--teacher-logits online")
        if problems:
            raise UserError("; ".join(problems))
        return config

    def settle(self, run) -> None:
        """The last step of common.recipes.resolve_recipe (`run`: this config resolved): with
        --teacher-logits stored the stored view (aug none, mixup 0, cutmix 0, unless given: the start line
        says so), the stopping rule checked against the held-out split (stopping.settle_stop_rule: the start
        line states it, or says why a recipe's falls back), then `resolved()`, whose errors name the options
        whose value came from the recipe."""
        off = {}
        if self.teacher_logits == "stored":  # the student must see the stored view: no augmentation, no mixup
            off = {k: v for k, v in _STORED_VIEW.items() if k not in run.given and getattr(self, k) != v}
            if off:
                run.config = replace(self, **off)
                run.reason += f"; --teacher-logits stored: {', '.join(f'{k} {v}' for k, v in off.items())}"
        settle_stop_rule(run)  # needs a held-out split: a recipe's rule falls back to the fixed schedule without one
        run.config = run.check(run.config.resolved, also_given=off)


# The settings that change the order of the samples or the augmentation draws (effect "order"): refused on
# resume with their own message (common.options.differences finds every refused change; those of effect
# "none" may change). Derived from the declarations above.
ORDER_CHANGES = tuple(s.name for s in options_of(TrainConfig) if s.effect == "order")


RENAMED = {"batch_size": "batch_size_per_rank"}  # old setting name -> new, in checkpoints and config.json


def _defaults(cls: type) -> dict:
    """A config class's declared defaults: the value of a setting added after a run was recorded."""
    return {f.name: f.default for f in fields(cls)}


def run_settings(config: TrainConfig, loss_config: Any, hashed_only: bool = False) -> dict:
    """The settings of a run as recorded (config.json; `hashed_only`: the checkpoint's fingerprint):
    TrainConfig's options and, flat beside them, those of its loss."""
    if hashed_only:
        return hashed(config) | hashed(loss_config)
    return {s.name: getattr(config, s.name) for s in options_of(config)} | {
        s.name: getattr(loss_config, s.name) for s in options_of(loss_config)}


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """The hashed settings that differ between a recorded run (`old`: its config.json or fingerprint,
    written by this or an older version) and this one (`new`, as `run_settings` gives them): TrainConfig's
    and those of the loss, a setting the record lacks taking its declared default."""
    old = {RENAMED.get(k, k): v for k, v in old.items()}
    changed = differences(old, new, TrainConfig, _defaults(TrainConfig))
    loss = LOSSES.get(new.get("loss"))
    if loss is not None and old.get("loss", "kd") == new.get("loss"):
        changed += differences(old, new, loss.Config, _defaults(loss.Config))
    return changed
