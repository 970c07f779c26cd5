"""What a synthesis method provides to `synth generate`.

A method is one file in `synth/methods/` with a config dataclass and a class that
  - `fit(teacher, state_dir, progress, seed)`: trains whatever it needs against the frozen teacher, restartably
    (checkpoints in `state_dir`; calling it again after a kill continues where it stopped);
  - `synthesize(labels, streams, generator)`: returns images in [0, 1], (B, C, H, W), at the
    teacher's input size, for the given target classes, on `self.compute.device`. `streams` says which ensemble member
    (or other sub-source) makes each image; `generator` is the torch RNG to draw noise from, so
    that a shard's content depends only on its seed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from dfkd.common.accel import Compute
from dfkd.common.errors import UserError
from dfkd.common.options import make_config, parse_options


class SynthesisMethod:
    name: str = ""
    Config: type = object
    labels_from_teacher = False   # True: a sample's class is the teacher's argmax, not the requested one
    compute = Compute()           # device and speed switches (set by `build_method`); noise is drawn on the CPU
    # called after each training step with the steps done; returning True ends training there (with a
    # checkpoint to load): how `synth generate` times its first steps and `--estimate` a few
    on_step: Callable[[int], bool] | None = None

    def __init__(self, config, spec):
        self.config = config
        self.spec = spec

    @property
    def num_streams(self) -> int:
        return 1

    def stream_resolution(self, k: int) -> int:
        """The resolution stream k generates at, before any upsampling to the teacher's size."""
        return self.spec.size

    def training_steps(self) -> int:
        """The steps `fit` trains for (each one trains every generator of this process); 0: no training."""
        return 0

    def with_training_steps(self, steps: int) -> "SynthesisMethod":
        """A copy of this method that trains `steps` steps (`synth generate --estimate` times its first ones)."""
        return self

    def fit(self, teacher: nn.Module, state_dir: Path, progress: bool = True, seed: int = 0) -> None:
        raise NotImplementedError

    def synthesize(self, labels: torch.Tensor, streams: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def fit_parallel(self, teacher: nn.Module, state_dir: Path, progress: bool, seed: int, rank: int,
                     world_size: int, barrier: Callable[[], None]) -> None:
        """`fit` as rank `rank` of `world_size` processes that share `state_dir`; every rank returns
        ready to `synthesize`. Default: rank 0 fits, then the others run `fit`, which (being
        restartable) loads the finished checkpoints. Methods whose work splits override this."""
        if rank == 0:
            self.fit(teacher, state_dir, progress=progress, seed=seed)
        barrier()
        if rank != 0:
            self.fit(teacher, state_dir, progress=False, seed=seed)


def parse_config(config_cls: type, options: dict[str, Any], where: str = "--set"):
    """A method config from `key=value` strings or typed values (`--set`, a recipe's method table),
    parsed and validated as the config's option declarations say (common/options.py)."""
    return make_config(config_cls, parse_options(config_cls, options, where))


def require_input_size(teacher: nn.Module, channels: int, size: int, fix: str) -> None:
    """UserError (with `fix`) unless `teacher` runs on a (2, channels, size, size) batch."""
    device = next(teacher.parameters(), torch.empty(0)).device
    try:
        with torch.no_grad():
            teacher(torch.zeros(2, channels, size, size, device=device))
    except RuntimeError:
        raise UserError(f"the teacher cannot take {size} px inputs: {fix}") from None


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU RNG whose seed is a fixed mix of integers (seed, shard, step, ...)."""
    seed = 0x9E3779B97F4A7C15
    for p in parts:
        seed = (seed * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return torch.Generator().manual_seed(seed)
