"""What a training loss of `distill train` provides (`--loss NAME`, one file each in distill/losses/).

A loss is a class with a `name`, a `Config` dataclass whose every option is declared with
common.options.option() (its `distill train` flags, help, checks, its recipe table
[distill.loss.<name>] and its part of the checkpoint's fingerprint come from there) and a call that
takes the logits of one batch (`Logits`) and returns a dict of tensors: "loss", the total that is
trained on, and its named terms, each already weighted, so that they add up to "loss" (as timm's
distillation task returns its loss and parts). The loop logs every term as `loss_<name>` in steps.csv
and metrics.csv. A loss sees its own Config only, never the run's other settings.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Logits(NamedTuple):
    """What a loss sees of one training batch (all on the device)."""

    student: torch.Tensor  # float32 (B, K): the student on its view
    teacher: torch.Tensor  # float32 (B, K): the online teacher on the same (mixed) view, or the stored logits
    labels: torch.Tensor   # int64 (B,): the class each image was synthesised for
    perm: torch.Tensor     # int64 (B,): the partner each image was mixed with (itself without mixing)
    lam: torch.Tensor      # float32 (B,): the share of each image's own pixels (1 without mixing)


class Loss:
    name: str = ""
    Config: type = object

    def __init__(self, config):
        self.config = config

    def __call__(self, logits: Logits) -> dict[str, torch.Tensor]:
        raise NotImplementedError
