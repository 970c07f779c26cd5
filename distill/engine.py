"""The optimisation: the optimiser and the warmup + cosine schedule both trainers share (with the cool-down
that the stopping rule of `distill train` starts, stopping.py), and the EMA of the student's weights
(`ema_decay`; evaluated and saved beside the student)."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from dfkd.common.errors import UserError

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(model: nn.Module, opt: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, Nesterov) or AdamW over all parameters."""
    if opt == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if opt == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise UserError(f"unknown optimiser '{opt}'; use one of {', '.join(OPTIMIZERS)}")


class WarmupCosine:
    """The per-step factor of the learning rate: linear warm-up to 1 over `warmup_steps`, then cosine decay to 0
    at `total_steps`; after `cool_down(start, steps)` (the stopping rule, stopping.py) from step `start` on the
    factor it had there, annealed to 0 over `steps` steps (cosine-shaped). A callable object, not a function:
    torch's LambdaLR.state_dict keeps an object's __dict__ (a function's state is lost), so the cool-down is
    in the checkpoint with the rest of the scheduler."""

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total_steps = total_steps
        self.warmup_steps = min(warmup_steps, total_steps - 1)
        self.cool_down_start: int | None = None   # the first step of the cool-down; None: none
        self.cool_down_steps = 0

    def planned(self, step: int) -> float:
        """The factor of the schedule over all `total_steps` (no cool-down)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def cool_down(self, start: int, steps: int) -> None:
        """From step `start` on, anneal the factor it has there to 0 over `steps` (>= 1) steps."""
        self.cool_down_start, self.cool_down_steps = start, steps

    def __call__(self, step: int) -> float:
        start = self.cool_down_start
        if start is None or step < start:
            return self.planned(step)
        progress = min((step - start) / self.cool_down_steps, 1.0)
        return self.planned(start) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warmup to the base lr over `warmup_steps`, then cosine decay to 0
    (`WarmupCosine`; `cool_down` may end it earlier)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps))


def cool_down(scheduler: torch.optim.lr_scheduler.LambdaLR, start: int, steps: int) -> None:
    """Anneal `scheduler` (a `warmup_cosine`) to 0 over `steps` steps from step `start` on: the learning rate
    of step `start` is the one it had, the last step's is close to 0."""
    for factor in scheduler.lr_lambdas:
        factor.cool_down(start, steps)


class ModelEma:
    """Exponential moving average of a model's parameters: ema = decay * ema + (1 - decay) * param after
    every optimiser step; buffers (BatchNorm statistics) are copied. `module` is evaluated and saved."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = [p for p in self.module.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        for ema_buffer, buffer in zip(self.module.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
