"""Speed switches of the KD trainer and the pieces DDP needs; all off by default where they could
change results. The switches shared with `synth generate` (amp, channels_last, compile, the device) are
defined in `common/accel.py`.

  amp            none | bf16 (autocast, CPU or GPU) | fp16 (autocast + GradScaler, GPU only)
  channels_last  NHWC memory layout for student, teacher and input batches
  compile        torch.compile of the student (after DDP wrapping) and of the teacher

Only the student is wrapped in DistributedDataParallel; the teacher is frozen and runs as is.
"""
from __future__ import annotations

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
