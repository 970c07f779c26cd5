"""`distill`: the command line of stage two; thin adapters over distill.train, distill.teacher and
distill.report.

Defaults live in TrainConfig / TeacherConfig; the options show them. Bad input ends in a one-line
`Error: ...` (UserError, exit code 2). Under torchrun, `distill train` is one rank of a DDP job
(`torchrun --nproc_per_node=N -m distill train ...`); only rank 0 prints.
"""
from __future__ import annotations

from dataclasses import fields

import click
import torch

from common import distributed
from common.shards import CHECK_LEVELS

from .data import AUGMENTATIONS
from .engine import OPTIMIZERS
from .losses import LOSSES
from .teacher import TEACHER_AUGMENTATIONS, TeacherConfig, train_teacher
from .throughput import AMP_MODES
from .config import BAD_SHARD_POLICIES, DEFAULT_LR, DEFAULT_WD, TEACHER_LOGITS, TrainConfig
from .train import train


def default(config_class: type, name: str):
    """The dataclass default of one field (one source of truth for library and CLI)."""
    return next(f.default for f in fields(config_class) if f.name == name)


def run_options(command):
    """--threads and --quiet, shared by the commands (as in `synth generate`)."""
    command = click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")(command)
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="torch CPU threads per process [default: torch's choice; under torchrun the node's "
                        "cores / processes per node; use 1 when other jobs share the cores]")(command)


def apply_run_options(options: dict) -> dict:
    """Apply --threads (under torchrun default: cores per process); turn --quiet into the configs'
    `progress`. Returns the remaining options."""
    threads = options.pop("threads")
    if threads is None and distributed.info().enabled:
        threads = distributed.default_threads()
    if threads:
        torch.set_num_threads(threads)
    return options | {"progress": not options.pop("quiet")}


def _format(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main():
    """Stage two of data-free KD: distill students from synth's shards; train teachers on real data."""


@main.command("train")
@click.option("--shards", required=True,
              help="Folder written by `synth generate` (shards + manifest.json): a path, an http(s):// URL, or a "
              "pipe: command with {name} for the file name (e.g. 'pipe:aws s3 cp s3://b/shards/{name} -').")
@click.option("--student", required=True,
              help="Student model name (e.g. lenet5_half, resnet18, timm/resnet18, my_pkg.nets:build).")
@click.option("--out", required=True, help="Run folder: config.json, checkpoint.pt, metrics.csv, student.pt.")
@click.option("--teacher-weights", default=None,
              help="Teacher checkpoint; default: the weights recorded in the manifest (checked by sha256).")
@click.option("--student-weights", default=default(TrainConfig, "student_weights"),
              help="Initial student weights: none, DEFAULT (torchvision) or a checkpoint path.")
@click.option("--epochs", type=click.IntRange(min=1), default=default(TrainConfig, "epochs"))
@click.option("--batch-size-per-rank", type=click.IntRange(min=1), default=default(TrainConfig, "batch_size_per_rank"),
              help="Images per process per step; under torchrun the global batch is this x the number of processes.")
@click.option("--opt", type=click.Choice(OPTIMIZERS), default=default(TrainConfig, "opt"),
              help="SGD (momentum 0.9, Nesterov) or AdamW.")
@click.option("--lr", type=float, default=None, show_default=False,
              help=f"Peak learning rate [default: {DEFAULT_LR['sgd']} for sgd, {DEFAULT_LR['adamw']} for adamw]")
@click.option("--wd", type=float, default=None, show_default=False,
              help=f"Weight decay [default: {DEFAULT_WD['sgd']} for sgd, {DEFAULT_WD['adamw']} for adamw]")
@click.option("--warmup-epochs", type=float, default=default(TrainConfig, "warmup_epochs"),
              help="Linear warmup, then cosine decay per step.")
@click.option("--loss", type=click.Choice(tuple(LOSSES)), default=default(TrainConfig, "loss"),
              help="Training loss by name (distill/losses.py); each of its terms is logged as loss_<name> in "
              "steps.csv and metrics.csv.")
@click.option("--temperature", type=float, default=default(TrainConfig, "temperature"), help="KD temperature T.")
@click.option("--ce-weight", type=float, default=default(TrainConfig, "ce_weight"),
              help="Weight of cross-entropy on the stored labels, added to the KD loss.")
@click.option("--mixup", type=float, default=default(TrainConfig, "mixup"),
              help="Mixup Beta(alpha, alpha) of image pairs, labelled by the online teacher; 0 = off.")
@click.option("--aug", type=click.Choice(AUGMENTATIONS), default=default(TrainConfig, "aug"),
              help="Student-side augmentation: translate (shift up to size/8 px), crop (reflect-pad crop by size/8 px, "
              "no flip: MNIST-M), crop-flip (natural images).")
@click.option("--workers", type=click.IntRange(min=0), default=default(TrainConfig, "workers"),
              help="DataLoader workers reading shards (needs at least as many shards).")
@click.option("--eval-data", default=None,
              help="Real held-out set for top-1: mnist, cifar10, cifar100, svhn, stl10 (their test split), imagenet "
              "or a train/val folder (its val/), or an ImageFolder path.")
@click.option("--data-root", default=default(TrainConfig, "data_root"), help="Where MNIST lives (or is fetched to).")
@click.option("--seed", type=int, default=default(TrainConfig, "seed"))
@click.option("--device", default=default(TrainConfig, "device"), help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its last checkpoint (starts it when there is none yet).")
@click.option("--verify-shards", type=click.Choice(CHECK_LEVELS), default=default(TrainConfig, "verify_shards"),
              help="Before the first step, check every shard file against the manifest: full (size and "
                   "sha256), size (fast), none.")
@click.option("--on-bad-shard", type=click.Choice(BAD_SHARD_POLICIES), default=default(TrainConfig, "on_bad_shard"),
              help="A shard that is missing or does not match the manifest: stop with an error, or skip it "
                   "(counted and reported).")
@click.option("--detect-anomaly", is_flag=True,
              help="torch.autograd anomaly detection (slow): names the operation that made a NaN.")
@click.option("--teacher-logits", type=click.Choice(TEACHER_LOGITS), default=default(TrainConfig, "teacher_logits"),
              help="online: the teacher labels the student's augmented view; stored: the logits in the shards "
              "(no teacher in memory; needs --aug none --mixup 0).")
@click.option("--label-smoothing", type=float, default=default(TrainConfig, "label_smoothing"),
              help="Label smoothing of the CE term (needs --ce-weight > 0).")
@click.option("--clip-grad", type=float, default=default(TrainConfig, "clip_grad"),
              help="Clip the gradients' global norm to this; 0 = off.")
@click.option("--ema-decay", type=float, default=default(TrainConfig, "ema_decay"),
              help="Keep an EMA of the student's weights (per step, e.g. 0.999), evaluated and saved too; 0 = off.")
@click.option("--amp", type=click.Choice(AMP_MODES), default=default(TrainConfig, "amp"),
              help="Mixed precision: bf16 autocast (CPU or GPU), fp16 autocast + GradScaler (GPU).")
@click.option("--channels-last", is_flag=True, help="NHWC memory layout for models and batches.")
@click.option("--compile", is_flag=True, help="torch.compile the student (after DDP) and the teacher.")
@click.option("--pin-memory", is_flag=True, help="Page-locked batches for faster host-to-GPU copies (CUDA only).")
@click.option("--persistent-workers", is_flag=True, help="Keep DataLoader workers alive between epochs.")
@run_options
def train_command(**options):
    """Distill a student from a shard folder, with the teacher run online on every augmented batch
    (or from the logits stored in the shards). Under torchrun: DDP over all ranks, --batch-size-per-rank
    images per rank."""
    metrics = train(TrainConfig(**apply_run_options(options)))
    if distributed.info().is_main:
        click.echo(f"done: {_format(metrics)}")


@main.command("teacher")
@click.option("--model", required=True,
              help="Model name (e.g. lenet5, cifar_resnet20, resnet18, timm/resnet18, my_pkg.nets:build).")
@click.option("--out", required=True, help="Checkpoint file to write (e.g. runs/teacher/lenet5.pt).")
@click.option("--data", default=default(TeacherConfig, "data"),
              help="Training set: mnist, mnistm (built offline from MNIST and photographs), cifar10, cifar100, svhn, "
              "stl10 (under --data-root, downloaded when missing), imagenet (--data-root/imagenet/train), a folder with train/ and val/ trees, or an "
              "ImageFolder path.")
@click.option("--data-root", default=default(TeacherConfig, "data_root"),
              help="Where the datasets by name live (or are downloaded to); decoded image caches go to its cache/.")
@click.option("--eval-data", default=None,
              help="Test set, named as --data [default: the test split of a dataset by name, val/ of a train/val "
              "folder; none for a plain ImageFolder]")
@click.option("--epochs", type=click.IntRange(min=1), default=default(TeacherConfig, "epochs"))
@click.option("--batch-size", type=click.IntRange(min=1), default=default(TeacherConfig, "batch_size"))
@click.option("--lr", type=float, default=default(TeacherConfig, "lr"), help="Peak SGD learning rate.")
@click.option("--wd", type=float, default=default(TeacherConfig, "wd"), help="Weight decay.")
@click.option("--warmup-epochs", type=float, default=default(TeacherConfig, "warmup_epochs"))
@click.option("--translate", type=click.IntRange(min=0), default=default(TeacherConfig, "translate"),
              help="Random shift of up to this many px (--aug translate); 0 = off.")
@click.option("--aug", type=click.Choice(TEACHER_AUGMENTATIONS), default=default(TeacherConfig, "aug"),
              help="Train-time augmentation. auto: crop-flip for natural images (pad-crop by size/8 + flip; "
              "random-resized crop + flip above 64 px), crop without flip for mnistm, translate for digits (mnist, svhn, "
              "1-channel folders).")
@click.option("--resolution", type=click.IntRange(min=1), default=None,
              help="Model input size [default: the model's own; required for a module:callable model without "
              "an input_spec]")
@click.option("--workers", type=click.IntRange(min=0), default=default(TeacherConfig, "workers"),
              help="DataLoader workers for ImageFolder data (MNIST is held in memory).")
@click.option("--seed", type=int, default=default(TeacherConfig, "seed"))
@click.option("--device", default=default(TeacherConfig, "device"), help="auto, cpu, cuda or cuda:N.")
@run_options
def teacher_command(**options):
    """Train a teacher on real data and save it for `synth generate --weights`."""
    metrics = train_teacher(TeacherConfig(**apply_run_options(options)))
    click.echo(f"done: {_format(metrics)}")


@main.command("export")
@click.argument("run", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output folder [default: RUN/export].")
@click.option("--format", "formats", multiple=True, type=click.Choice(("export", "torchscript", "onnx")),
              help="Formats to write (repeatable) [default: export (torch.export .pt2) and torchscript, plus onnx "
              "where the onnx package is installed]")
@click.option("--ema", is_flag=True, help="Export the EMA of the student's weights (student_ema.pt).")
@click.option("--atol", type=float, default=1e-4, show_default=True,
              help="Largest allowed logit difference (plus 1e-4 x |logit|) between an export and the trained model.")
def export_command(run, out, formats, ema, atol):
    """Write RUN's student in formats that deploy without this code, check each one's logits against the
    trained model on a batch, and record the input spec in student.json beside them."""
    from .export import export_run

    result = export_run(run, out, formats or None, ema=ema, atol=atol)
    for name, path in result.files.items():
        diff = result.max_abs_diff.get(name)
        click.echo(f"wrote {path}" + (f" (max logit difference {diff:.2g})" if diff is not None else " (not run)"))
    click.echo(f"wrote {result.spec_file}")


@main.command("report")
@click.argument("run", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Where the curves PNG goes [default: RUN/curves.png].")
def report_command(run, out):
    """Training curves of RUN (loss, top-1, learning rate) as a PNG, and its per-epoch table."""
    from .report import format_table, report_run

    report = report_run(run, out)
    click.echo(format_table(report.table))
    click.echo(report.summary)
    click.echo(f"wrote {report.image}")
