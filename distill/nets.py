"""The models of a run: the frozen teacher (checked against the manifest), the student shaped for the
shards, a trial pass of both on one batch of the shards' shape, `Models`, what a training step runs, and
the teacher's view of native-resolution images (`native_view_logits`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd.common.errors import UserError
from dfkd.common.models import CheckpointError, ModelNameError, WeightsUnavailableError, create_model, state_dict_sha256
from dfkd.common.shards import Manifest

from .engine import ModelEma


@dataclass
class Models:
    """What a training step runs: `model` (the student, maybe in DDP / compiled) and `student` (the plain
    module: its parameters, spec and state_dict), `teacher` (None with stored logits), and the extras."""

    model: nn.Module
    student: nn.Module
    teacher: nn.Module | None
    teacher_spec: object
    scaler: torch.amp.GradScaler
    ema: ModelEma | None = None



def load_teacher(manifest: Manifest, weights: str | None, device: torch.device) -> nn.Module:
    """The teacher that made the shards, frozen in eval mode. `weights` None: the manifest's record.
    UserError unless the weights' checksum equals the manifest's."""
    record, spec = manifest.teacher, manifest.input_spec
    if weights is None:
        weights = record.get("weights_path") or record["weights"]
        if record.get("weights_path") and not Path(weights).is_file():
            raise UserError(f"the teacher weights recorded in the manifest, {weights}, are gone: "
                            "pass --teacher-weights PATH to a copy of them")
    seed = int(manifest.config.get("seed", 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # synth seeds before building, so a random ('none') teacher can be rebuilt
        teacher = create_model(record["arch"], num_classes=spec.num_classes, weights=weights,
                               in_chans=spec.channels, input_size=spec.size)
    found = state_dict_sha256(teacher)
    if found != record["weights_sha256"] and weights in ("none", "None", ""):
        raise UserError(f"the shards were made by a randomly initialised {record['arch']} (weights 'none') that "
                        f"seed {seed} does not rebuild: pass --teacher-weights PATH to a checkpoint of that teacher")
    if found != record["weights_sha256"]:
        raise UserError(f"the shards were made by another teacher: {record['arch']} weights '{weights}' have sha256 "
                        f"{found[:12]}..., the manifest records {record['weights_sha256'][:12]}...; "
                        "pass --teacher-weights PATH to the weights used by `synth generate`")
    return teacher.eval().requires_grad_(False).to(device)


def build_student(name: str, weights: str, manifest: Manifest) -> nn.Module:
    """The student `name` with `weights` (--student, --student-weights), shaped for the shards' images and
    classes (UserError if its weights do not fit)."""
    spec = manifest.input_spec
    try:
        return create_model(name, num_classes=manifest.num_classes, weights=weights,
                            in_chans=spec.channels, input_size=spec.size)
    except (CheckpointError, ModelNameError, WeightsUnavailableError):
        raise  # a file that cannot be used, a name that builds no model, weights out of reach: not a misfit
    except UserError as e:
        raise UserError(f"student {name} with weights '{weights}' does not fit the shards "
                        f"({spec.channels} x {spec.size} x {spec.size} images, {manifest.num_classes} classes): "
                        f"{e.message}. Pass --student-weights none, or weights made for this input and class "
                        "count") from None


def check_models_fit(teacher: nn.Module | None, student: nn.Module, manifest: Manifest, student_name: str,
                     device: torch.device) -> None:
    """Run teacher (unless None: stored logits) and student once on a batch of the shards' shape, before
    the first step: UserError (saying what to do) for a model that cannot take the input or has another
    number of outputs."""
    spec = manifest.input_spec
    shape = f"{spec.channels} x {spec.size} x {spec.size}"
    images = torch.full((2, spec.channels, spec.size, spec.size), 0.5, device=device)
    for role, model, fix in (
            ("student", student, f"choose a student that takes {spec.size} px input, or regenerate the shards "
                                 "at a size it takes (`synth generate --resolution N`)"),
            ("teacher", teacher, "regenerate the shards with this teacher")):
        if model is None:
            continue
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(model.input_spec.normalize(images))
        except (RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:160]
            name = student_name if role == "student" else manifest.teacher["arch"]
            raise UserError(f"{role} {name} cannot take the shards' {shape} images ({first}); {fix}") from None
        finally:
            model.train(was_training)
        if tuple(logits.shape) != (2, manifest.num_classes):
            raise UserError(f"{role} outputs {tuple(logits.shape)[1:]} per image, the shards have "
                            f"{manifest.num_classes} classes; {fix}")


def native_view_logits(teacher: torch.nn.Module, spec, images: torch.Tensor, resolution: torch.Tensor,
                       perm: torch.Tensor) -> torch.Tensor:
    """The teacher's logits of each image at its native resolution: (B, C, S, S) images downsampled (area)
    to `resolution` (B,) per image, a mixed pair (image i blended with perm[i]) at the larger of its two;
    0 or >= S: the image as it is. One teacher pass per distinct size (eval-mode BN: per-image results)."""
    size = images.shape[-1]
    res = torch.where((resolution <= 0) | (resolution > size), torch.full_like(resolution, size), resolution)
    res = torch.maximum(res, res[perm])
    logits = None
    for r in res.unique().tolist():
        idx = (res == r).nonzero().squeeze(1)
        x = images[idx] if r == size else F.interpolate(images[idx], size=(r, r), mode="area")
        try:
            out = teacher(spec.normalize(x))
        except RuntimeError as e:
            if r == size:
                raise
            raise UserError(f"--teacher-view native: the teacher cannot take the {r} px images these shards "
                            f"record ({str(e).splitlines()[0]}); use --teacher-view stored") from None
        if logits is None:
            logits = out.new_empty((images.shape[0], out.shape[1]))
        logits[idx] = out
    return logits
