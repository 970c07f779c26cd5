"""Gaussian noise: the floor every method must beat (no training; the teacher only labels the noise).

Pixels ~ N(mean, std) of the teacher's own normalisation (so after normalisation the teacher sees
standard normal inputs), clipped to [0, 1]. Labels are the teacher's argmax, not the requested class.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from dfkd.common.options import option

from .base import SynthesisMethod


@dataclass
class NoiseConfig:
    OPTION_LABEL = "noise option"

    scale: float = option(1.0, min=0.0, help="Noise std in units of the teacher's normalisation std.")


class GaussianNoise(SynthesisMethod):
    """Gaussian-noise images labelled by the teacher: the data-free floor."""

    name = "noise"
    Config = NoiseConfig
    labels_from_teacher = True

    def fit(self, teacher: nn.Module, state_dir: Path, progress: bool = True, seed: int = 0) -> None:
        return None

    def synthesize(self, labels: torch.Tensor, streams: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        spec = self.spec
        z = torch.randn(labels.shape[0], spec.channels, spec.size, spec.size, generator=generator)
        z = z.to(self.compute.device)
        mean = torch.tensor(spec.mean, device=z.device).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, device=z.device).view(1, -1, 1, 1)
        return (mean + self.config.scale * std * z).clamp(0, 1)
