"""The optimisation: the optimiser and the warmup + cosine schedule both trainers share, and the EMA of the
student's weights (`ema_decay`; evaluated and saved beside the student)."""
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


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warmup to the base lr over `warmup_steps`, then cosine decay to 0."""
    warmup_steps = min(warmup_steps, total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
