"""DeepInversion (Yin et al. 2020): optimise the pixels of each batch directly against the frozen teacher.

No training stage: every batch of a shard starts from Gaussian noise in the teacher's normalised input
space, x ~ N(0, 1), and runs Adam(lr, betas=(0.5, 0.9)) on

    loss = CE(teacher(j(x)), y)
         + bn_weight * (first_bn_weight * R_1 + sum_{l>1} R_l)     BN statistics, R_l = ||mu - mu_l||_2 +
                                                                     ||var - var_l||_2 (synth/bn_stats.py)
         + tv_weight * TV_L2(x)      TV_L2 = sum over the 4 neighbour directions (right, down and both
                                     diagonals) of the L2 norm of the pixel differences over the batch
         + l2_weight * ||x||_2

where j() is a random jitter (a roll of up to `jitter` px in x and y) and, with `flip`, a random
horizontal flip, both drawn per iteration. After each step x is clipped to the range that maps to
[0, 1] pixels. The batch with the lowest loss over all iterations is kept (the paper's "best" images).

Two-phase schedule (DeepInversion's multi-resolution setting): with `low_res_iterations` > 0, the
first phase runs that many iterations with the teacher seeing x average-pooled 2 x 2 (half the size,
a quarter of the teacher's cost), then `iterations` more at full size; the kept batch comes from the
full-size phase. Randomness (start noise, jitter, flips) comes from the shard's RNG, so a shard's
bytes depend only on its seed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd.common.accel import compile_module, grad_scaler
from dfkd.common.options import option
from dfkd.common.options import validate as validate_options

from ..bn_stats import BNStatsLoss
from .base import SynthesisMethod, require_input_size


@dataclass
class DeepInversionConfig:
    OPTION_LABEL = "deepinversion option"

    iterations: int = option(200, min=1, help="Full-resolution Adam steps per batch.")
    low_res_iterations: int = option(0, min=0, help="Optional first phase at half resolution (2x2 average "
                                     "pooling); 0 = none.")
    lr: float = option(0.1, min=0.0, help="Adam learning rate on the pixels (betas 0.5, 0.9).")
    bn_weight: float = option(0.05, min=0.0, help="Weight of the BN-statistics term.")
    first_bn_weight: float = option(10.0, min=0.0, help="Extra factor on the first BN layer's term.")
    tv_weight: float = option(1e-4, min=0.0, help="Weight of the total-variation (smoothness) term.")
    l2_weight: float = option(1e-5, min=0.0, help="Weight of the L2 norm of the image.")
    jitter: int = option(2, min=0, help="Max random roll in pixels per iteration (the paper: 30 at 224 px).")
    flip: bool = option(True, help="Random horizontal flips (turn off for digits and text).")

    def validate(self) -> None:
        validate_options(self)


def tv_l2(x: torch.Tensor) -> torch.Tensor:
    """Sum over right, down and the two diagonal neighbour directions of ||x_p - x_q||_2 over the batch."""
    return (torch.linalg.vector_norm(x[..., :, 1:] - x[..., :, :-1])
            + torch.linalg.vector_norm(x[..., 1:, :] - x[..., :-1, :])
            + torch.linalg.vector_norm(x[..., 1:, 1:] - x[..., :-1, :-1])
            + torch.linalg.vector_norm(x[..., 1:, :-1] - x[..., :-1, 1:]))


def jitter_flip(x: torch.Tensor, max_shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """x rolled by a random (dy, dx) in [-max_shift, max_shift] and, if `flip`, mirrored with p = 1/2."""
    if max_shift:
        dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if flip and torch.rand((), generator=generator).item() < 0.5:
        x = torch.flip(x, dims=(3,))
    return x


class DeepInversion(SynthesisMethod):
    """Per-batch pixel optimisation against the teacher's BN statistics (no generator)."""

    name = "deepinversion"
    Config = DeepInversionConfig

    def __init__(self, config: DeepInversionConfig, spec):
        super().__init__(config, spec)
        self.teacher: nn.Module | None = None
        self.net: nn.Module | None = None   # the teacher as the optimisation calls it (compiled with --compile)
        self._bn: BNStatsLoss | None = None

    def fit(self, teacher: nn.Module, state_dir: Path, progress: bool = True, seed: int = 0) -> None:
        self.teacher = teacher
        self.net = teacher  # compiled lazily by synthesize, after its hooks are in place
        if self.config.low_res_iterations:
            require_input_size(teacher, self.spec.channels, self.spec.size // 2,
                               "set low_res_iterations=0 (the half-resolution phase needs a teacher that "
                               "accepts half-size images)")

    def _bn_hooks(self):
        """The BN-statistics hooks for one batch's optimisation. With --compile they are installed once
        and kept (the compiled teacher traces them on its first call and must keep seeing the same ones)."""
        if not self.compute.compile:
            return BNStatsLoss(self.teacher, self.config.first_bn_weight)
        if self._bn is None:
            self._bn = BNStatsLoss(self.teacher, self.config.first_bn_weight)
            self.net = compile_module(self.teacher, True)
        return contextlib.nullcontext(self._bn)

    def _bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised values of pixel 0 and pixel 1, per channel (on the device)."""
        device = self.compute.device
        zero = self.spec.normalize(torch.zeros(1, self.spec.channels, 1, 1, device=device))
        one = self.spec.normalize(torch.ones(1, self.spec.channels, 1, 1, device=device))
        return zero, one

    def loss_terms(self, x: torch.Tensor, labels: torch.Tensor, bn: BNStatsLoss) -> dict[str, torch.Tensor]:
        """Every term of the loss for the teacher's view x (normalised space), after a teacher forward."""
        with self.compute.autocast():
            logits = self.net(x).float()
        cfg = self.config
        terms = {"ce": F.cross_entropy(logits, labels), "bn": bn.loss(), "tv": tv_l2(x),
                 "l2": torch.linalg.vector_norm(x)}
        terms["total"] = (terms["ce"] + cfg.bn_weight * terms["bn"] + cfg.tv_weight * terms["tv"]
                          + cfg.l2_weight * terms["l2"])
        return terms

    def synthesize(self, labels: torch.Tensor, streams: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("DeepInversion.synthesize called before fit()")
        cfg, spec, compute = self.config, self.spec, self.compute
        lo, hi = self._bounds()
        x = compute.batch(torch.randn(labels.shape[0], spec.channels, spec.size, spec.size, generator=generator))
        labels = labels.to(compute.device)
        x = torch.max(torch.min(x, hi), lo).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9), eps=1e-8)
        scaler = grad_scaler(compute.amp, compute.device)
        best, best_loss = x.detach().clone(), float("inf")
        schedule = [(True, cfg.low_res_iterations), (False, cfg.iterations)]
        with torch.enable_grad(), self._bn_hooks() as bn:
            for low_res, iterations in schedule:
                for _ in range(iterations):
                    view = jitter_flip(x, cfg.jitter // 2 if low_res else cfg.jitter, cfg.flip, generator)
                    if low_res:
                        view = F.avg_pool2d(view, 2)
                    loss = self.loss_terms(view, labels, bn)["total"]
                    if not low_res and loss.item() < best_loss:   # the loss belongs to x before this step
                        best_loss, best = loss.item(), x.detach().clone()
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    with torch.no_grad():
                        x.copy_(torch.max(torch.min(x, hi), lo))
        std = torch.tensor(spec.std, device=compute.device).view(1, -1, 1, 1)
        mean = torch.tensor(spec.mean, device=compute.device).view(1, -1, 1, 1)
        return (best * std + mean).clamp(0, 1)
