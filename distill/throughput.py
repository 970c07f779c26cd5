"""Speed switches of the KD trainer and the pieces DDP needs; all off by default where they could
change results. The switches shared with `synth generate` (amp, channels_last, compile, the device) are
defined in `common/accel.py`.

  amp            none | bf16 (autocast, CPU or GPU) | fp16 (autocast + GradScaler, GPU only)
  channels_last  NHWC memory layout for student, teacher and input batches
  compile        torch.compile of the student (after DDP wrapping) and of the teacher
  ema_decay      an exponential moving average of the student's weights, updated every step

Only the student is wrapped in DistributedDataParallel; the teacher is frozen and runs as is.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from dfkd.common.accel import compile_module, to_layout


def batch_to(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch's images on `device` as float pixels in [0, 1] (uint8 travels, and is converted there)."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    return to_layout(images, channels_last)


def wrap_student(student: nn.Module, device: torch.device, distributed: bool, compile_: bool) -> nn.Module:
    """The module the training step calls: the student, in DDP when distributed, compiled on request.
    Parameters are shared with `student`, whose state_dict stays the one to save."""
    model = student
    if distributed:
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    return compile_module(model, compile_)


def wrap_teacher(teacher: nn.Module, compile_: bool) -> nn.Module:
    return compile_module(teacher, compile_)


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
