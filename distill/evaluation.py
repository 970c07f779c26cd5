"""What a `distill train` run measures of its models: the top-1 on real evaluation data (`--eval-data`;
`distill teacher` too), and the validation signal on the held-out synthetic split (`--val-shards`,
validation.py)."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from dfkd.common.shards import shard_paths

from .data import Decoder, ShardSamples, collate, real_batches
from .throughput import batch_to
from .validation import ValSet

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
    reader = ShardSamples({u: r.num_samples for u, r in records.items()}, records=records, verify=verify)
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
