"""`synth`: stage one on the command line (thin adapters over `synth.generate` and `common.shards`).

    synth generate --teacher resnet50 --out shards/ --num-images 100000   # pretrained weights, the imagenet recipe
    synth generate --teacher lenet5 --weights runs/teacher/lenet5.pt --out shards/mnist   # the small-grey recipe
    synth generate --teacher lenet5 --weights T.pt --recipe my.toml --num-images 1000     # a recipe file, one override
    synth generate --teacher lenet5 --weights runs/teacher/lenet5.pt --out shards/mnist --set steps=800
    synth generate --teacher resnet50 --out shards/ --estimate    # projected hours, images/s, disk; no shards
    synth methods                      # each method's options (--set key=value), their meaning and defaults
    synth verify shards/mnist          # check shards against the manifest
    synth inspect shards/mnist         # contact sheet, class histogram, per-class summary table
    torchrun --nproc_per_node=4 -m dfkd.synth generate ...   # 4 processes, each writes every 4th shard
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from dfkd.common import distributed
from dfkd.common.clihelp import GroupedCommand, grouped_option
from dfkd.common.errors import UserError
from dfkd.common.options import click_options, describe, explicit_values, options_of
from dfkd.common.recipes import recipe_keys, shipped_names
from dfkd.common.shards import (TIMM_READABLE_FORMATS, VAL_SPLIT, dataset_warnings, held_out_folder, read_held_out,
                                read_manifest, verify_dataset)

from .estimate import ESTIMATE_NAME, Estimate, process_seconds
from .generate import GenerateConfig, generate
from .methods import METHODS
from .select import summary_line


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


@main.command("generate", cls=GroupedCommand, groups=GenerateConfig.HELP_GROUPS)
@click_options(GenerateConfig, recipe_keys=recipe_keys("synth"))
@grouped_option("--set", "sets", group="Method", multiple=True, metavar="KEY=VALUE",
                help="A method option (repeatable; over the recipe's method table); `synth methods` lists them.")
@grouped_option("--threads", group="Execution", type=int, default=None,
                help="torch CPU threads per process (default: torch's choice; under torchrun cores / processes).")
@grouped_option("--quiet", group="Execution", is_flag=True, help="No progress bars.")
def generate_cmd(sets, threads, quiet, **flags):
    """Train the synthesis method against the teacher and write the synthetic dataset.

    Options not given come from the recipe (--recipe; by default chosen from the teacher's input: the
    line `recipe: ...` on stderr says which), else from the defaults shown. Rerun the same command after
    an interruption to continue: finished shards are kept. The settings that change the images (all but
    --write-workers, --threads, --quiet, --overwrite, --out, --weights' path) must match.
    """
    if threads is None and distributed.info().enabled:
        threads = distributed.default_threads()  # torch's default would give every rank all the cores
    if threads:
        import torch

        torch.set_num_threads(threads)
    given = explicit_values(flags)
    if sets:
        given["method_options"] = _parse_sets(sets)
    if quiet:
        given["progress"] = False
    given["launch_s"] = process_seconds()
    manifest = generate(GenerateConfig(**given))
    if isinstance(manifest, Estimate):
        click.echo(manifest.summary())
        click.echo(f"wrote {Path(given.get('out', 'shards')) / ESTIMATE_NAME} (no shards)")
        return
    if distributed.info().is_main:
        out = given.get("out", "shards")
        click.echo(f"wrote {manifest.num_samples} images in {len(manifest.shards)} shards to {out}")
        if manifest.selection is not None:
            click.echo(summary_line(manifest.selection))
        held_out = read_held_out(out)
        if held_out is not None and held_out.complete:
            click.echo(f"held-out split: {held_out.num_samples} images in {held_out_folder(out)} (for `distill train "
                       "--val-shards`, found there by default)")
        if manifest.image_format not in TIMM_READABLE_FORMATS:
            click.echo(f"note: {manifest.image_format} shards are read by `distill train` and plain webdataset, not by "
                       f"timm's wds/ dataset (it decodes {', '.join(TIMM_READABLE_FORMATS)} images); use "
                       "--image-format png for timm", err=True)


@main.command("methods")
def methods_cmd():
    """List the synthesis methods and their options (set with --set key=value; a recipe's
    [synth.method.<name>] table sets them too)."""
    for name, cls in METHODS.items():
        overridden = recipe_keys("method", name)
        click.echo(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        for spec, line in zip(options_of(cls.Config), describe(cls.Config)):
            mark = "  [recipes set it]" if spec.name in overridden else ""
            click.echo(f"  {line}{mark}")
    click.echo(f"\nrecipes ({', '.join(shipped_names())}; `synth generate --recipe NAME|PATH`, default: chosen from "
               "the teacher's input) set the options marked [recipes set it]; explicit --set values win.")


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
    held_out = read_held_out(folder)
    notes = dataset_warnings(folder) + ([f"{VAL_SPLIT}/{n}" for n in dataset_warnings(held_out_folder(folder))]
                                        if held_out is not None else [])
    for note in notes:
        click.echo(f"NOTE {note}")
    for problem in problems:
        click.echo(f"BAD  {problem}")
    if problems:
        click.echo(f"{len(problems)} problem(s) in {folder}: rerun the same `synth generate` to redo damaged shards, "
                   "restore them from a copy, or train without them (`distill train --on-bad-shard skip`)", err=True)
        sys.exit(1)
    click.echo(f"OK   {len(manifest.shards)} shards, {manifest.num_samples} samples"
               + ("" if no_decode else ", all decoded")
               + (f"; held-out split {VAL_SPLIT}/: {len(held_out.shards)} shards, {held_out.num_samples} samples"
                  if held_out is not None else ""))


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
    (samples, teacher agreement, confidence, entropy, duplicates), and what --select kept where it was used.
    Damaged shards are left out and listed; the exit code is then 1 (as for `synth verify`) unless
    --skip-bad-shards."""
    from .inspect import inspect_dataset

    report = inspect_dataset(folder, out, per_class=per_class, max_classes=max_classes, limit=limit, seed=seed)
    for skipped in report.skipped:
        click.echo(f"warning: skipped damaged shard {skipped}", err=True)
    with pd_options():
        click.echo(report.summary.to_string(float_format=lambda v: f"{v:.3f}"))
    if report.selection:
        click.echo(report.selection)
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
