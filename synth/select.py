"""Write-time selection (`synth generate --select`): draw more candidates than are written, run the teacher on
them, keep for each slot of the batch one candidate of the slot's class.

Training the generators is almost all of stage one's cost; drawing more images from trained ones is cheap, so
the writer can afford to choose. For a batch of n slots with requested classes y_1..y_n it draws
ceil(oversample x n) candidates in rounds of that same class pattern (every round a batch like the one it
replaces, so each class has at least as many candidates as slots, and DeepInversion optimises batches of the
usual size), computes the teacher's logits on the 8-bit candidates, and keeps per class, in draw order:

  boundary    among the candidates the teacher assigns to the class (argmax), the smallest margins
              (class logit minus the largest other): images still of the class but near a decision boundary;
  confident   among those, the largest margins.

When too few candidates of a class have the teacher's argmax on it, the rest of its slots are filled from the
others of that class, nearest to the class first (largest margin), and counted: a shard always holds exactly
the images the manifest plans. Methods whose class is the teacher's argmax (`labels_from_teacher`: noise) select
within the argmax class, with the class counts of the first round. Every choice depends only on the
candidates and their logits, which depend only on the shard's RNG: stage one's determinism holds.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Callable

import torch

from .writer import pixels_to_uint8

SELECT_MODES = ("none", "boundary", "confident")
COUNT_KEYS = ("candidates", "selected", "filled")


@dataclass
class SelectionCount:
    """What the selection did over some batches: candidates drawn, images kept, and slots filled with a
    candidate the teacher assigns to another class than the slot's."""

    candidates: int = 0
    selected: int = 0
    filled: int = 0

    def add(self, candidates: int, selected: int, filled: int) -> None:
        self.candidates += candidates
        self.selected += selected
        self.filled += filled

    def to_dict(self) -> dict:
        return asdict(self)


def candidate_count(n: int, oversample: float) -> int:
    """ceil(oversample x n), computed on the decimal value given (1.1 x 10 is 11, not the float's 12)."""
    return max(n, math.ceil(Fraction(repr(float(oversample))) * n))


def margins(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Per row: the logit of its class minus the largest other logit (> 0: the teacher's argmax is the class)."""
    own = logits.gather(1, classes[:, None]).squeeze(1)
    if logits.shape[1] == 1:
        return torch.full_like(own, math.inf)
    return own - logits.scatter(1, classes[:, None], -math.inf).max(1).values


def choose(logits: torch.Tensor, classes: torch.Tensor, slots: torch.Tensor, mode: str) -> tuple[torch.Tensor, int]:
    """(index of the candidate kept for each slot, how many slots got one the teacher assigns to another class).
    `logits` (M, K) and `classes` (M,) are the candidates', `slots` (N,) the classes to fill; every class needs
    at least as many candidates as slots. A class's kept candidates go to its slots in draw order."""
    if mode not in SELECT_MODES[1:]:
        raise ValueError(f"no selection mode {mode!r}")
    logits, classes, slots = logits.float().cpu(), classes.long().cpu(), slots.long().cpu()
    size = int(max(classes.max(), slots.max())) + 1
    need = torch.bincount(slots, minlength=size)
    if bool((torch.bincount(classes, minlength=size) < need).any()):
        raise ValueError("fewer candidates than slots for some class")
    margin = margins(logits, classes)
    agrees = logits.argmax(1) == classes
    # preference within a class: the teacher's class first (boundary: smallest margin first, confident: largest),
    # then the others by margin, largest (nearest to the class) first
    key = torch.where(agrees, margin, -margin) if mode == "boundary" else -margin
    order = torch.arange(len(classes))
    for part in (key, (~agrees).long(), classes):   # stable sorts, least significant key first
        order = order[torch.sort(part[order], stable=True).indices]
    sorted_classes = classes[order]
    rank = torch.arange(len(order)) - torch.searchsorted(sorted_classes, sorted_classes)
    kept = order[rank < need[sorted_classes]]
    kept = kept[torch.sort(kept).indices]                                  # draw order ...
    kept = kept[torch.sort(classes[kept], stable=True).indices]            # ... within each class
    index = torch.empty(len(slots), dtype=torch.long)
    index[torch.sort(slots, stable=True).indices] = kept                   # a class's slots in batch order
    return index, int((~agrees[index]).sum())


def select_batch(method, labels: torch.Tensor, streams: torch.Tensor, rng: torch.Generator,
                 logits_of: Callable[[torch.Tensor], torch.Tensor], mode: str, oversample: float,
                 count: SelectionCount | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(8-bit pixels, streams) of the candidates kept for the slots `labels` (made by `streams`): candidates
    drawn from `method` with `rng` in rounds of the slots' pattern, chosen by `choose` on `logits_of`'s logits.
    `count` is told what was drawn, kept and filled."""
    n = len(labels)
    total = candidate_count(n, oversample)
    pixels, logits, drawn_labels, drawn_streams = [], [], [], []
    for first in range(0, total, n):   # rounds of at most n: the teacher never sees more than a batch at once
        k = min(n, total - first)
        batch = pixels_to_uint8(method.synthesize(labels[:k], streams[:k], rng))
        pixels.append(batch)
        logits.append(logits_of(batch).cpu())
        drawn_labels.append(labels[:k])
        drawn_streams.append(streams[:k])
    logits_all = torch.cat(logits)
    classes = logits_all.argmax(1) if method.labels_from_teacher else torch.cat(drawn_labels)
    slots = classes[:n] if method.labels_from_teacher else labels
    index, filled = choose(logits_all, classes, slots, mode)
    if count is not None:
        count.add(total, n, filled)
    kept = torch.cat(pixels)[index.to(pixels[0].device)]
    return kept, torch.cat(drawn_streams)[index]


def summary_line(selection: dict) -> str:
    """'selected 40,000 of 80,000 candidates (boundary); 0.3% of slots filled from images the teacher assigns
    to another class', from a manifest's `selection` record."""
    selected, filled = selection["selected"], selection["filled"]
    share = 100 * filled / selected if selected else 0.0
    return (f"selected {selected:,} of {selection['candidates']:,} candidates ({selection['select']}); "
            f"{share:.1f}% of slots filled from images the teacher assigns to another class")
