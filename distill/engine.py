"""Pieces both trainers share: optimiser, warmup + cosine schedule, top-1 evaluation."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from dfkd.common.errors import UserError

from .data import real_batches

OPTIMIZERS = ("sgd", "adamw")
EVAL_BATCH_SIZE = 512


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
