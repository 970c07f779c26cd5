"""What a `distill train` run measures of its models, and what a failure of that means: the top-1 of the
student (and of its EMA) on the real evaluation data (`--eval-data`) after every epoch, the teacher's once,
and the validation signal on the held-out synthetic split (`--val-shards`, validation.py) after every epoch.
`evaluate_top1` serves `distill teacher` too.

    evaluation = Evaluation(device, workers=2, eval_data="mnist", student_data=..., val=...)
    measured, failure = evaluation.epoch_metrics(student, ema)   # a failure is reported after the checkpoint

Rank 0 alone measures: the other ranks' Evaluation holds no data and measures nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from dfkd.common.errors import UserError
from dfkd.common.shards import ShardFormatError, shard_paths

from .data import Decoder, ShardSamples, collate, real_batches
from .datasets import unreadable_reason
from .engine import ModelEma
from .run_folder import EMA_COLUMN
from .throughput import batch_to
from .validation import NONE, VAL_COLUMNS, ValSet

EVAL_BATCH_SIZE = 512   # real evaluation data
VAL_BATCH_SIZE = 256    # the held-out synthetic split


@torch.no_grad()
def evaluate_top1(model: nn.Module, dataset: Dataset, device: torch.device, workers: int = 0) -> float:
    """Top-1 accuracy in percent of `model` on (normalised input, label) pairs; restores train/eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    # a private generator for the loader's worker seed: evaluating never moves the training RNG
    for inputs, labels in real_batches(dataset, EVAL_BATCH_SIZE, workers=workers, generator=torch.Generator()):
        predictions = model(inputs.to(device, non_blocking=True)).argmax(1)
        correct += (predictions.cpu() == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def _batches(val: ValSet, verify: str) -> Iterator:
    """The split's samples in order, VAL_BATCH_SIZE at a time (common.shards' strict reader, each shard
    counted against the manifest; remote shards checked before use)."""
    urls = shard_paths(val.location, val.manifest)
    records = dict(zip(urls, val.manifest.shards))
    reader = ShardSamples({u: r.num_samples for u, r in records.items()}, records=records, verify=verify,
                          retry=val.retry)
    decode = Decoder(val.manifest.input_spec)
    batch = []
    for fields in reader({"url": u} for u in urls):
        batch.append(decode(fields))
        if len(batch) == VAL_BATCH_SIZE:
            yield collate(batch)
            batch = []
    if batch:
        yield collate(batch)


@torch.no_grad()
def measure(student: nn.Module, val: ValSet, device: torch.device, channels_last: bool = False,
            verify: str = "full") -> dict:
    """val_agreement (%) and val_kl (nats, T = 1) of `student` against the teacher's stored logits on
    every image of the split; restores train/eval mode."""
    was_training = student.training
    student.eval()
    agree, kl, count = 0, 0.0, 0
    for batch in _batches(val, verify):
        images = batch_to(batch.images, device, channels_last)
        s = student(student.input_spec.normalize(images)).float()
        t = batch.logits.to(device)
        agree += (s.argmax(1) == t.argmax(1)).sum().item()
        kl += F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="sum", log_target=True).item()
        count += t.shape[0]
    student.train(was_training)
    return {"val_agreement": 100.0 * agree / count, "val_kl": kl / count}


@dataclass
class Evaluation:
    """The evaluation of a run on `device`: `student_data` (the real evaluation data `eval_data` in the
    student's input space, or None), `teacher_data` (the same in the teacher's), `val` (the held-out
    synthetic split, or None); `workers` read the real data, `verify` checks the split's shards as they are
    read, `channels_last` lays out its batches."""

    device: torch.device
    workers: int = 0
    channels_last: bool = False
    verify: str = "full"
    eval_data: str | None = None
    student_data: Dataset | None = None
    teacher_data: Dataset | None = None
    val: ValSet | None = None

    def teacher_top1(self, teacher: nn.Module | None) -> float | None:
        """The teacher's top-1 on the evaluation data (None without it)."""
        if self.teacher_data is None:
            return None
        try:
            return evaluate_top1(teacher, self.teacher_data, self.device, self.workers)
        except OSError as e:  # an evaluation image damaged since the check (nothing trained yet)
            raise UserError(f"evaluating the teacher on {self.eval_data} failed ({unreadable_reason(e)}): replace "
                            "or remove that file, then rerun") from None

    def epoch_metrics(self, student: nn.Module, ema: ModelEma | None) -> tuple[dict, Exception | None]:
        """The epoch's validation signal and top-1 (and EMA top-1), and the exception if they failed: a failed
        evaluation must not lose the epoch, it is checkpointed first, then reported (`failure`)."""
        unmeasured = {"eval_top1": None} | ({EMA_COLUMN: None} if ema is not None else {})
        measured = dict(unmeasured)
        signal = dict.fromkeys(VAL_COLUMNS) if self.val is not None else {}
        try:
            if self.val is not None:
                signal = measure(student, self.val, self.device, self.channels_last, self.verify)
            if self.student_data is not None:
                measured["eval_top1"] = evaluate_top1(student, self.student_data, self.device, self.workers)
                if ema is not None:
                    measured[EMA_COLUMN] = evaluate_top1(ema.module, self.student_data, self.device, self.workers)
        except Exception as e:  # noqa: BLE001 (re-raised by the caller, after the checkpoint)
            return unmeasured | signal, e
        return measured | signal, None

    def failure(self, epoch: int, error: Exception, checkpoint: Path) -> Exception:
        """The error that reports a failed evaluation of epoch `epoch` (0-based), saved in `checkpoint` (the fix:
        rerun with --resume)."""
        if isinstance(error, (ShardFormatError, UserError)):  # the held-out split
            reason = str(error).strip().splitlines()[-1]
            location = self.val.location if self.val is not None else NONE
            return UserError(f"measuring epoch {epoch + 1} on --val-shards {location} failed ({reason}); "
                             f"the epoch is saved in {checkpoint}: check the split with `synth verify "
                             f"{location}`, then rerun with --resume, which measures it first")
        if not isinstance(error, OSError):
            return error
        return UserError(f"evaluating epoch {epoch + 1} on {self.eval_data} failed ({unreadable_reason(error)}); "
                         f"the epoch is saved in {checkpoint} with its top-1 left empty: replace or remove that "
                         "file and rerun with --resume, which evaluates it first")

    def missing(self, row: dict, student: nn.Module, ema: ModelEma | None, checkpoint: Path) -> dict:
        """What the epoch `row` of a restored student (and its EMA) lacks, measured now: the top-1 (its
        evaluation failed, or --eval-data is new) and the validation signal (likewise, or --val-shards is new);
        {} when it lacks nothing this run measures. UserError if measuring fails."""
        missing = {}
        if row["eval_top1"] is None and self.student_data is not None:
            models = {"eval_top1": student} | ({EMA_COLUMN: ema.module} if ema is not None else {})
            try:
                missing |= {column: evaluate_top1(model, self.student_data, self.device, self.workers)
                            for column, model in models.items()}
            except OSError as e:
                raise UserError(f"evaluating the last epoch in {checkpoint} on {self.eval_data} failed "
                                f"({unreadable_reason(e)}): replace or remove that file and rerun with --resume") from None
        if self.val is not None and row.get(VAL_COLUMNS[0]) is None:
            try:
                missing |= measure(student, self.val, self.device, self.channels_last, self.verify)
            except (ShardFormatError, OSError) as e:
                raise UserError(f"measuring the last epoch in {checkpoint} on --val-shards {self.val.location} "
                                f"failed ({str(e).strip().splitlines()[-1]}): check it with `synth verify "
                                f"{self.val.location}`, or pass --val-shards none") from None
        return missing


def format_val(row: dict) -> str:
    """The validation signal of an epoch's row, for its line."""
    if row.get("val_agreement") is None:
        return "val not measured"
    return f"val agreement {row['val_agreement']:.2f}%, val KL {row['val_kl']:.4f}"
