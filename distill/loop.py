"""One epoch of training steps (the models' logits of a mixed batch, the loss, backward, optional clipping,
optimiser and EMA step, schedule), with the loss logged about LOG_POINTS_PER_EPOCH times, the checks
that stop a diverged run and the faults an epoch can meet as UserErrors (`epoch_faults`). `Step` is how
each step runs: the pieces it needs of the run's settings, the loss with its own config and the batch
mixing among them."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from tqdm import tqdm

from dfkd.common.accel import autocast
from dfkd.common.errors import UserError
from dfkd.common.faults import fault_point
from dfkd.common.shards import ShardFormatError

from .augment import Mixing
from .data import Batch, ShardLoader
from .losses.base import Logits, Loss
from .nets import Models, native_view_logits
from .run_folder import TERM_PREFIX
from .throughput import batch_to

LOG_POINTS_PER_EPOCH = 20


class NonFiniteLoss(ArithmeticError):
    """The loss (or the weights) stopped being finite numbers."""


def check_finite_weights(model: nn.Module) -> None:
    """NonFiniteLoss if any parameter holds NaN or Inf (never checkpoint such a model)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteLoss(f"parameter {name} holds NaN/Inf after the last step")


def diverged(checkpoint: Path, epoch: int, reason: str) -> UserError:
    """The error that stops a run whose loss or weights became NaN/Inf in epoch `epoch` (0-based)."""
    kept = (f"{checkpoint} still holds epoch {epoch}, the last good one" if epoch > 0
            else "no checkpoint was written")
    return UserError(f"training stopped in epoch {epoch + 1}: {reason}; {kept}. Lower --lr (or --temperature, "
                     "--mixup) and train into a new --out, or rerun with --detect-anomaly to find the operation")


@contextlib.contextmanager
def epoch_faults(epoch: int, shards: str, checkpoint: Path, detect_anomaly: bool = False) -> Iterator[None]:
    """Epoch `epoch` (0-based) of a run on `shards` that checkpoints into `checkpoint`, with the faults it
    can meet as UserErrors: bad shard data, a loss or weights gone NaN/Inf (NonFiniteLoss; with
    `detect_anomaly`, torch.autograd's anomaly detection names the operation)."""
    try:
        with torch.autograd.set_detect_anomaly(detect_anomaly):
            yield
    except ShardFormatError as e:
        # from a DataLoader worker the message carries the worker's traceback: keep its last line
        reason = str(e).strip().splitlines()[-1].split("ShardFormatError: ", 1)[-1]
        fix = "" if "--on-bad-shard skip" in reason else f"; check the folder with `synth verify {shards}`"
        raise UserError(f"bad shard data in {shards}: {reason}{fix}") from None
    except NonFiniteLoss as e:
        raise diverged(checkpoint, epoch, str(e)) from None
    except RuntimeError as e:
        if detect_anomaly and "nan" in str(e).lower():
            raise diverged(checkpoint, epoch, str(e).strip().splitlines()[0][:200]) from None
        raise


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class Step:
    """How each training step runs: the loss (its own config), the batch mixing, where and how the models
    compute (`amp`, `channels_last`; `native_view`: the online teacher sees each image at the resolution
    its shard records) and the clipping of the gradients' global norm (0: off)."""

    loss: Loss
    mixing: Mixing
    device: torch.device
    amp: str = "none"
    channels_last: bool = False
    native_view: bool = False
    clip_grad: float = 0.0

    def logits(self, models: Models, batch: Batch) -> Logits:
        """Both models' logits of the batch: the student's view mixed, labelled by the online teacher on
        the same view; without a teacher (stored logits) the stored view and logits, unmixed."""
        device = self.device
        images = batch_to(batch.images, device, self.channels_last)
        if models.teacher is None:  # stored logits (TrainConfig.resolved() ensures: no augmentation, no mixing)
            n = images.shape[0]
            perm, lam = torch.arange(n, device=device), torch.ones(n, device=device)
            teacher_logits = batch.logits.to(device, non_blocking=True)
        else:
            images, perm, lam = self.mixing(images)
            with torch.no_grad(), autocast(self.amp, device):
                if self.native_view and batch.resolution is not None:
                    teacher_logits = native_view_logits(models.teacher, models.teacher_spec, images,
                                                        batch.resolution.to(device), perm)
                else:
                    teacher_logits = models.teacher(models.teacher_spec.normalize(images))
        with autocast(self.amp, device):
            student_logits = models.model(models.student.input_spec.normalize(images))
        return Logits(student_logits.float(), teacher_logits.float(), batch.labels.to(device), perm, lam)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
                   clip_grad: float = 0.0, parameters: list[nn.Parameter] | None = None, ema=None,
                   model: nn.Module | None = None) -> float:
    """One update from `loss`, the step both trainers take: backward through the grad scaler (disabled
    unless fp16: a plain backward), gradients clipped to a global norm of `clip_grad` (0: off) over
    `parameters`, the optimiser step, the EMA of `model` updated (when `ema`), the schedule stepped.
    Returns the learning rate the step used."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
    scaler.step(optimizer)
    scaler.update()
    if ema is not None:
        ema.update(model)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return lr


def train_one_epoch(models: Models, loader: ShardLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, step: Step, epoch: int, epochs: int,
                    step_log: list[dict] | None = None, show: bool = True) -> dict:
    """One pass of `len(loader)` steps of `step` (epoch `epoch` of `epochs`; `show`: a progress bar). Returns
    train_loss (this rank's mean), terms ({loss_<name>: this rank's mean of each term of the loss}), lr (of
    the last step), seconds. Appends the mean loss, its terms and the lr of about LOG_POINTS_PER_EPOCH
    windows to `step_log`. NonFiniteLoss as soon as a step's loss is NaN or Inf. The terms are summed on the
    device (detached) and read only at the log points: no extra synchronisation per step."""
    models.model.train()
    start = time.perf_counter()
    total_loss, lr = 0.0, 0.0
    window, window_loss = max(1, len(loader) // LOG_POINTS_PER_EPOCH), 0.0
    parameters = list(models.student.parameters())
    window_terms, epoch_terms = {}, {}
    with tqdm(loader.epoch(epoch), total=len(loader), desc=f"epoch {epoch + 1}/{epochs}", disable=not show,
              leave=False) as bar:
        for i, batch in enumerate(bar):
            terms = step.loss(step.logits(models, batch))
            loss = terms.pop("loss")
            lr = optimizer_step(loss, optimizer, scheduler, models.scaler, step.clip_grad, parameters,
                                ema=models.ema, model=models.student)
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLoss(f"the loss is {value} at step {i + 1} of the epoch")
            total_loss += value
            window_loss += value
            for name, term in terms.items():
                term = term.detach()
                window_terms[name] = window_terms[name] + term if name in window_terms else term
                epoch_terms[name] = epoch_terms[name] + term if name in epoch_terms else term
            if step_log is not None and ((i + 1) % window == 0 or i + 1 == len(loader)):
                count = (i % window) + 1
                step_log.append({"epoch": epoch + 1, "step": epoch * len(loader) + i + 1, "lr": lr,
                                 "train_loss": window_loss / count}
                                | {TERM_PREFIX + name: term.item() / count for name, term in window_terms.items()})
                window_loss, window_terms = 0.0, {}
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            fault_point("train-step")
    return {"train_loss": total_loss / len(loader), "lr": lr, "seconds": time.perf_counter() - start,
            "terms": {TERM_PREFIX + name: term.item() / len(loader) for name, term in epoch_terms.items()}}

