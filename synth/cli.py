"""`synth`: stage one on the command line (thin adapters over `synth.generate` and `common.shards`).

    synth generate --teacher resnet50 --weights DEFAULT --out shards/ --num-images 100000
    synth generate --teacher lenet5 --weights runs/teacher/lenet5.pt --out shards/mnist --set steps=800
    synth methods                      # each method's options (--set key=value) and defaults
    synth verify shards/mnist          # check shards against the manifest
    synth inspect shards/mnist         # contact sheet, class histogram, per-class summary table
    torchrun --nproc_per_node=4 -m synth generate ...   # 4 processes, each writes every 4th shard
"""
from __future__ import annotations

import dataclasses
import sys

import click

from common import distributed
from common.accel import AMP_MODES
from common.errors import UserError
from common.shards import IMAGE_FORMATS, TIMM_READABLE_FORMATS, dataset_warnings, read_manifest, verify_dataset

from .generate import GenerateConfig, generate
from .methods import METHODS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Stage one of data-free distillation: synthesise a dataset from a teacher, as WebDataset shards."""


def _parse_sets(values: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for item in values:
        if "=" not in item:
            raise UserError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip()] = value.strip()
    return options


@main.command("generate")
@click.option("--teacher", required=True,
              help="Teacher architecture: lenet5, cifar_resnet20, resnet50, ..., timm/<name>, or module.path:callable.")
@click.option("--weights", default="DEFAULT", show_default=True,
              help="Teacher weights: DEFAULT / a torchvision weights name (download; timm's pretrained weights for "
              "timm/<name>), a checkpoint path, or none.")
@click.option("--out", default="shards", show_default=True, type=click.Path(file_okay=False),
              help="Output folder for shards and manifest.")
@click.option("--method", type=click.Choice(sorted(METHODS)), default="generator", show_default=True)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="A method option (repeatable); `synth methods` lists them.")
@click.option("--num-images", default=50_000, show_default=True, type=int)
@click.option("--shard-size", default=5_000, show_default=True, type=int, help="Images per shard.")
@click.option("--image-format", type=click.Choice(IMAGE_FORMATS), default="png", show_default=True)
@click.option("--resolution", type=int, default=None, help="Teacher input size (default: the model's own).")
@click.option("--num-classes", type=int, default=None, help="Classes of a teacher built with --weights none.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=500, show_default=True, type=int,
              help="Images per batch when writing shards (changes MUSE's and DeepInversion's images: part of "
                   "the config a rerun must match).")
@click.option("--overwrite", is_flag=True, help="Delete earlier output in --out and start over.")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when available), cpu, cuda or cuda:N; under torchrun each process takes its "
                   "LOCAL_RANK GPU.")
@click.option("--amp", type=click.Choice(AMP_MODES), default="none", show_default=True,
              help="Autocast teacher and generators to bfloat16 (CPU or GPU) or float16 (GPU, GradScaler). "
                   "Changes the images.")
@click.option("--channels-last", is_flag=True,
              help="NHWC memory layout for teacher and generators (faster convolutions on GPUs). Can change "
                   "the images in the last bits.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile teacher and generators (compiles in the first steps). Can change the images "
                   "in the last bits.")
@click.option("--write-workers", type=click.IntRange(min=0), default=None,
              help="Processes that encode and tar the images while the device works [default, at most 16: on "
                   "a GPU the process's cores - 1, on the CPU the cores its torch threads leave free; 0: none]. "
                   "Never changes the bytes.")
@click.option("--threads", type=int, default=None,
              help="torch CPU threads per process (default: torch's choice; under torchrun cores / processes).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def generate_cmd(teacher, weights, out, method, sets, num_images, shard_size, image_format, resolution,
                 num_classes, seed, batch_size, overwrite, device, amp, channels_last, compile_, write_workers,
                 threads, quiet):
    """Train the synthesis method against the teacher and write the synthetic dataset.

    Rerun the same command after an interruption to continue: finished shards are kept. The settings
    that change the images (all but --write-workers, --threads, --quiet, --overwrite) must match.
    """
    if threads is None and distributed.info().enabled:
        threads = distributed.default_threads()  # torch's default would give every rank all the cores
    if threads:
        import torch

        torch.set_num_threads(threads)
    manifest = generate(GenerateConfig(
        teacher=teacher, weights=weights, out=out, method=method, method_options=_parse_sets(sets),
        num_images=num_images, shard_size=shard_size, image_format=image_format, resolution=resolution,
        num_classes=num_classes, seed=seed, batch_size=batch_size, overwrite=overwrite, progress=not quiet,
        device=device, amp=amp, channels_last=channels_last, compile=compile_, write_workers=write_workers))
    if distributed.info().is_main:
        click.echo(f"wrote {manifest.num_samples} images in {len(manifest.shards)} shards to {out}")
        if image_format not in TIMM_READABLE_FORMATS:
            click.echo(f"note: {image_format} shards are read by `distill train` and plain webdataset, not by timm's "
                       f"wds/ dataset (it decodes {', '.join(TIMM_READABLE_FORMATS)} images); use --image-format png "
                       "for timm", err=True)


@main.command("methods")
def methods_cmd():
    """List the synthesis methods and their options (set with --set key=value)."""
    for name, cls in METHODS.items():
        click.echo(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(cls.Config):
            click.echo(f"  {f.name} = {f.default!r}")


@main.command("verify")
@click.argument("folder", type=click.Path())
@click.option("--no-decode", is_flag=True, help="Check presence, size and sha256 only (faster).")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Shards checked at once [default: up to 4, one per CPU core].")
def verify_cmd(folder, no_decode, jobs):
    """Check every shard in FOLDER against its manifest: present, size, sha256, every sample decodable and
    of the manifest's shape, sample counts, unique keys. Exit code 1 when something is wrong."""
    manifest = read_manifest(folder, require_complete=False)
    problems = verify_dataset(folder, decode=not no_decode, jobs=jobs)
    for note in dataset_warnings(folder):
        click.echo(f"NOTE {note}")
    for problem in problems:
        click.echo(f"BAD  {problem}")
    if problems:
        click.echo(f"{len(problems)} problem(s) in {folder}: rerun the same `synth generate` to redo damaged shards, "
                   "restore them from a copy, or train without them (`distill train --on-bad-shard skip`)", err=True)
        sys.exit(1)
    click.echo(f"OK   {len(manifest.shards)} shards, {manifest.num_samples} samples"
               + ("" if no_decode else ", all decoded"))


@main.command("inspect")
@click.argument("folder", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where the PNGs and summary.csv go [default: FOLDER/inspect].")
@click.option("--per-class", type=click.IntRange(min=1), default=10, show_default=True,
              help="Random samples per class on the contact sheet.")
@click.option("--max-classes", type=click.IntRange(min=1), default=20, show_default=True,
              help="Rows of the contact sheet (the first classes).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Read only the first N samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which random samples the sheet shows.")
@click.option("--skip-bad-shards", is_flag=True,
              help="Summarise the readable shards and exit 0 even if some are damaged (default: exit code 1).")
def inspect_cmd(folder, out, per_class, max_classes, limit, seed, skip_bad_shards):
    """Look at FOLDER: a contact sheet (a row of samples per class), a class histogram and a per-class table
    (samples, teacher agreement, confidence, entropy, duplicates). Damaged shards are left out and listed;
    the exit code is then 1 (as for `synth verify`) unless --skip-bad-shards."""
    from .inspect import inspect_dataset

    report = inspect_dataset(folder, out, per_class=per_class, max_classes=max_classes, limit=limit, seed=seed)
    for skipped in report.skipped:
        click.echo(f"warning: skipped damaged shard {skipped}", err=True)
    with pd_options():
        click.echo(report.summary.to_string(float_format=lambda v: f"{v:.3f}"))
    for path in report.files:
        click.echo(f"wrote {path}")
    if report.skipped:
        total = read_manifest(folder, require_complete=False).num_samples
        what = f"skipped {report.skipped_line(total)} that are damaged: the summary covers only the rest"
        if skip_bad_shards:
            click.echo(f"warning: {what} (--skip-bad-shards)", err=True)
            return
        click.echo(f"{what}; `synth verify {folder}` lists the problems, rerun the same `synth generate` to redo "
                   "those shards, or pass --skip-bad-shards to accept a summary without them", err=True)
        sys.exit(1)


def pd_options():
    import pandas as pd

    return pd.option_context("display.max_rows", 60, "display.width", 120)
