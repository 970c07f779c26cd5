"""A validation signal without real data: the held-out synthetic split (`distill train --val-shards`; found
and checked with the run's inputs, inputs.open_val_set), the signal measured on it (evaluation.measure) and
the ranking of the epochs by that signal (`--keep best-val`).

The split is a shard folder of the run's teacher that training never reads: by default the `val/` split
`synth generate` writes beside the training shards (common.shards.VAL_SPLIT). After every epoch the
student runs on each of its images (the stored view, no augmentation) and is compared with the teacher's
logits stored with it:

    val_agreement   % of images on which the student's argmax is the teacher's
    val_kl          mean over images of KL(softmax(t) || softmax(s)) at T = 1, in nats: the same scale
                    whatever --temperature the run trains at, so runs compare

`--keep best-val` keeps the student of the epoch ranked best (`best_epoch`): the lowest val_kl, ties
broken by the higher val_agreement, then by the earlier epoch; `--stop-patience` ends the run once val_kl
stops falling (stopping.py; `has_val_split` says before the run whether it has a split to stop on). The real
evaluation data never takes part.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from dfkd.common.remote import Retry
from dfkd.common.shards import Manifest, read_held_out

AUTO, NONE = "auto", "none"
KEEP = ("last", "best-val")
VAL_COLUMNS = ("val_agreement", "val_kl")
BEST_VAL_FILE = "student_best_val.pt"


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


def has_val_split(value: str, shards: str) -> bool:
    """Whether `--val-shards value` gives the run a split, known before anything is read but a manifest: a named
    one (opened and checked with the run's inputs), or with auto a complete val/ split beside local `shards`."""
    if value == NONE:
        return False
    if value != AUTO:
        return True
    held_out = read_held_out(shards)
    return held_out is not None and held_out.complete


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
