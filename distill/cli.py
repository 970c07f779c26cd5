"""`distill`: the command line of stage two; thin adapters over distill.train, distill.teacher and
distill.report.

Every option of `train` and `teacher` is declared once, in TrainConfig / TeacherConfig (help, checks,
default); `train`'s unset options come from the recipe (--recipe; by default the shards' own, else the
one chosen from the teacher's input), then from those defaults. Bad input ends in a one-line
`Error: ...` (UserError, exit code 2). Under torchrun, `distill train` is one rank of a DDP job
(`torchrun --nproc_per_node=N -m dfkd.distill train ...`); only rank 0 prints.
"""
from __future__ import annotations

import click
import torch

from dfkd.common import distributed
from dfkd.common.clihelp import GroupedCommand, grouped_option
from dfkd.common.options import click_options, explicit_values, options_of
from dfkd.common.recipes import recipe_keys

from .config import TrainConfig
from .losses import LOSSES
from .teacher import TeacherConfig, train_teacher
from .train import train


def run_options(command):
    """--threads and --quiet, shared by the commands (as in `synth generate`), in the help group Execution."""
    command = grouped_option("--quiet", group="Execution", is_flag=True,
                             help="No progress bars or per-epoch lines.")(command)
    return grouped_option("--threads", group="Execution", type=click.IntRange(min=1), default=None,
                          help="torch CPU threads per process [default: torch's choice; under torchrun the node's "
                          "cores / processes per node; use 1 when other jobs share the cores]")(command)


def apply_run_options(options: dict) -> dict:
    """Apply --threads (under torchrun default: cores per process); turn --quiet into the configs'
    `progress`. Returns the remaining options."""
    threads = options.pop("threads", None)
    if threads is None and distributed.info().enabled:
        threads = distributed.default_threads()
    if threads:
        torch.set_num_threads(threads)
    return options | {"progress": not options.pop("quiet", False)}


def _format(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main():
    """Stage two of data-free KD: distill students from synth's shards; train teachers on real data."""


def loss_options(command):
    """The options of every loss (`--temperature`, ...: distill/losses/), as flags of `distill train`."""
    for name, loss in reversed(LOSSES.items()):
        command = click_options(loss.Config, recipe_keys=recipe_keys("loss", name))(command)
    return command


def _with_loss_options(options: dict) -> dict:
    """The flags of the losses' options gathered into TrainConfig's `loss_options`."""
    names = {s.name for loss in LOSSES.values() for s in options_of(loss.Config)}
    given = {k: options.pop(k) for k in list(options) if k in names}
    return options | ({"loss_options": given} if given else {})


@main.command("train", cls=GroupedCommand, groups=TrainConfig.HELP_GROUPS)
@click_options(TrainConfig, recipe_keys=recipe_keys("distill"))
@loss_options
@run_options
def train_command(**options):
    """Distill a student from a shard folder, with the teacher run online on every augmented batch
    (or from the logits stored in the shards). Under torchrun: DDP over all ranks, --batch-size-per-rank
    images per rank."""
    metrics = train(TrainConfig(**_with_loss_options(apply_run_options(explicit_values(options)))))
    if distributed.info().is_main:
        click.echo(f"done: {_format(metrics)}")


@main.command("teacher", cls=GroupedCommand, groups=TeacherConfig.HELP_GROUPS)
@click_options(TeacherConfig)
@run_options
def teacher_command(**options):
    """Train a teacher on real data and save it for `synth generate --weights`."""
    metrics = train_teacher(TeacherConfig(**apply_run_options(explicit_values(options))))
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
@click.option("--out", type=click.Path(), default=None,
              help="Where the curves PNG goes: a file, or a folder (FOLDER/curves.png) [default: RUN/curves.png].")
def report_command(run, out):
    """Training curves of RUN (loss, top-1, learning rate) as a PNG, and its per-epoch table."""
    from .report import format_table, report_run

    report = report_run(run, out)
    click.echo(format_table(report.table))
    click.echo(report.summary)
    click.echo(f"wrote {report.image}")
