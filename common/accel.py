"""Where and how both stages compute: the device, and the speed switches that `synth generate` and
`distill train` share under the same names.

  device         auto (CUDA when available, else CPU) | cpu | cuda | cuda:N
  amp            none | bf16 (autocast, CPU or GPU) | fp16 (autocast + GradScaler, GPU only)
  channels_last  NHWC memory layout for models and input batches
  compile        torch.compile of the models that run every step

`DFKD_COMPILE_BACKEND` picks torch.compile's backend (default inductor; the tests use aot_eager, which
traces like inductor but generates no code).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import distributed
from .errors import UserError

AMP_MODES = ("none", "bf16", "fp16")


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; otherwise the named device (UserError if it is not there)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{name}' requested but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} CUDA "
                            f"GPU(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def prepare_device(name: str, amp: str) -> torch.device:
    """The device this process computes on: `name` resolved (`resolve_device`; under torchrun this process's
    LOCAL_RANK GPU), checked against `amp` (`check_amp`) and, a GPU, made the current CUDA device."""
    device = distributed.device_for(resolve_device(name))
    check_amp(amp, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def check_amp(amp: str, device: torch.device) -> None:
    if amp not in AMP_MODES:
        raise UserError(f"unknown --amp '{amp}'; use one of {', '.join(AMP_MODES)}")
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA GPU (its GradScaler is CUDA-only); use --amp bf16 on the CPU")


def autocast(amp: str, device: torch.device):
    """The autocast context of one forward pass (a no-op for amp 'none')."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active for fp16 only (disabled, it passes calls straight through)."""
    return torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=amp == "fp16")


def to_memory_format(model: nn.Module, channels_last: bool) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if channels_last else model


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A 4-D batch in NHWC memory layout when `channels_last` (values unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def compile_module(model: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile(model) when enabled (parameters stay shared with `model`); the model itself otherwise."""
    if not enabled:
        return model
    return torch.compile(model, backend=os.environ.get("DFKD_COMPILE_BACKEND", "inductor"))


@dataclass(frozen=True)
class Compute:
    """How a stage computes: the device and the speed switches (see the module docstring)."""

    device: torch.device = torch.device("cpu")
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False

    def autocast(self):
        return autocast(self.amp, self.device)

    def model(self, model: nn.Module) -> nn.Module:
        """`model` moved to the device in the chosen memory layout (in place; returns it)."""
        return to_memory_format(model.to(self.device), self.channels_last)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        """A batch (drawn on the CPU) moved to the device, in the chosen layout."""
        return to_layout(x.to(self.device, non_blocking=True), self.channels_last)

    def hashed(self) -> dict:
        """The part that can change the bytes of what is computed (recorded in a config hash)."""
        return {"device": self.device.type, "amp": self.amp, "channels_last": self.channels_last,
                "compile": self.compile}
