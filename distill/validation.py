"""A validation signal without real data: the student against the teacher on a held-out synthetic split
(`distill train --val-shards`, `--keep best-val`).

The split is a shard folder of the run's teacher that training never reads: by default the `val/` split
`synth generate` writes beside the training shards (common.shards.VAL_SPLIT). After every epoch the
student runs on each of its images (the stored view, no augmentation) and is compared with the teacher's
logits stored with it:

    val_agreement   % of images on which the student's argmax is the teacher's
    val_kl          mean over images of KL(softmax(t) || softmax(s)) at T = 1, in nats: the same scale
                    whatever --temperature the run trains at, so runs compare

`--keep best-val` keeps the student of the epoch ranked best (`best_epoch`): the lowest val_kl, ties
broken by the higher val_agreement, then by the earlier epoch. The real evaluation data never takes part.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd.common.errors import UserError
from dfkd.common.remote import Retry, is_remote
from dfkd.common.shards import (VAL_SPLIT, Manifest, check_shard_files, held_out_folder, held_out_mismatch,
                                read_held_out, read_manifest, shard_paths)

from .data import Decoder, ShardSamples, collate
from .throughput import batch_to

AUTO, NONE = "auto", "none"
KEEP = ("last", "best-val")
VAL_COLUMNS = ("val_agreement", "val_kl")
BEST_VAL_FILE = "student_best_val.pt"
VAL_BATCH_SIZE = 256


@dataclass
class ValSet:
    """A held-out synthetic split, checked against the training shards."""

    location: str
    manifest: Manifest
    retry: Retry = Retry()  # of its remote shards' transfers

    @property
    def identity(self) -> dict:
        """What a checkpoint records of the split its epochs were ranked on."""
        return {"location": self.location, "shards": [s.sha256 for s in self.manifest.shards]}


def auto_location(shards: str) -> str | None:
    """The held-out split beside local training shards (`<shards>/val` with a complete manifest), or None.
    A split still being written is left out with a note on stderr."""
    held_out = read_held_out(shards)   # None for remote shards too: not probed over the network (--val-shards URL)
    if held_out is None:
        return None
    folder = held_out_folder(shards)
    if not held_out.complete:
        print(f"note: {folder} is unfinished (rerun the same `synth generate` to finish it): no validation signal "
              "this run", file=sys.stderr, flush=True)
        return None
    return str(folder)


def open_val_set(value: str, shards: str, train_manifest: Manifest, verify: str = "full",
                 check_files: bool = True, retry: Retry = Retry()) -> ValSet | None:
    """The split `--val-shards value` names (auto: `auto_location`; none: None), checked: a complete shard
    folder of the same teacher, classes and image size as the training shards, synthetic, not the
    training shards themselves, its files matching its manifest (`verify`, when `check_files`)."""
    if value == NONE:
        return None
    location = auto_location(shards) if value == AUTO else value
    if location is None:
        return None
    fix = f"pass the {VAL_SPLIT}/ split `synth generate` wrote beside --shards, or --val-shards none"
    try:
        manifest = read_manifest(location)
    except UserError as e:
        raise UserError(f"--val-shards {location}: {e.message}; or {fix}") from None
    same = (location.rstrip("/") == str(shards).rstrip("/") if is_remote(location) or is_remote(shards)
            else Path(location).resolve() == Path(shards).resolve())
    if same:
        raise UserError(f"--val-shards {location} is the training shards; {fix}")
    if manifest.method.startswith("real"):
        raise UserError(f"--val-shards {location} holds real images ({manifest.method}): the validation signal "
                        f"is synthetic, so that no real data chooses the checkpoint; {fix}")
    mismatch = held_out_mismatch(train_manifest, manifest)
    if mismatch:
        raise UserError(f"--val-shards {location} does not fit the training shards ({mismatch}); {fix}")
    if check_files:
        bad = check_shard_files(location, manifest, verify)
        if bad:
            name, why = next(iter(bad.items()))
            raise UserError(f"--val-shards {location}: {len(bad)} shard(s) do not match its manifest ({name}: {why}); "
                            f"check it with `synth verify {location}` and rerun the same `synth generate`, or "
                            "pass --val-shards none")
    return ValSet(location, manifest, retry)


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


def _measured(row: dict) -> bool:
    return all(isinstance(row.get(c), (int, float)) and row.get(c) == row.get(c) for c in VAL_COLUMNS)


def best_epoch(rows: Iterable[dict]) -> dict | None:
    """The row ranked best by the validation signal: lowest val_kl, then highest val_agreement, then the
    earliest epoch; None when no row has both values. KL first: on a split from the training generators
    the agreement saturates near 100% within a few epochs (steps of one image in 500), while the KL keeps
    ranking (results/val_signal.md: on MNIST-M the agreement-first choice cost up to 12 points, on MNIST the
    two rankings kept the same epochs)."""
    ranked = [row for row in rows if _measured(row)]
    if not ranked:
        return None
    return min(ranked, key=lambda row: (row["val_kl"], -row["val_agreement"], row["epoch"]))
