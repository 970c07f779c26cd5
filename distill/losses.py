"""Stage two's training losses, by name in LOSSES (`distill train --loss`; the names: LOSS_NAMES).

A loss takes (models, batch, config, device), runs the models on the batch and returns a dict of
tensors: "loss", the total that is trained on, and its named terms, each already weighted, so that they
add up to "loss" (as timm's distillation task returns its loss and parts). The loop logs every term as
`loss_<name>` in steps.csv and metrics.csv.

"kd": KL(softmax(t/T) || softmax(s/T)) * T^2 against the online teacher on the same (mixed) view, or
against the logits stored in the shards; plus ce_weight * CE on the stored labels (term "ce", only with
ce_weight > 0), with optional label smoothing and the lam-weighted pair of labels of mixup or cutmix. With
teacher_view native the online teacher sees each image at the native resolution its shard records
(native_view_logits), the view MUSE's native-mode streams were synthesised for.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dfkd.common.errors import UserError

from .config import TrainConfig
from .data import Batch
from .loss_names import LOSS_NAMES
from .nets import Models
from .throughput import autocast, batch_to


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch (Hinton et al. 2015)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def mixup(images: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blend every image with a random partner, each pair with its own lam ~ Beta(alpha, alpha):
    lam * x + (1 - lam) * x[perm]. Returns (mixed images, perm, lam of shape (B,)); alpha = 0: unchanged."""
    n = images.shape[0]
    if alpha <= 0:
        return images, torch.arange(n, device=images.device), torch.ones(n, device=images.device)
    lam = torch.distributions.Beta(alpha, alpha).sample((n,)).to(images.device)
    perm = torch.randperm(n).to(images.device)
    w = lam.view(-1, *([1] * (images.dim() - 1)))
    return w * images + (1 - w) * images[perm], perm, lam


def cutmix(images: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste into every image a box of a random partner (Yun et al. 2019), a box per pair: lam ~ Beta(alpha,
    alpha), the box sqrt(1 - lam) of each side, centred uniformly and clipped at the borders. Returns (mixed
    images, perm, lam of shape (B,): the share of each image's own pixels after clipping); alpha = 0: unchanged."""
    n, h, w = images.shape[0], images.shape[-2], images.shape[-1]
    if alpha <= 0:
        return images, torch.arange(n, device=images.device), torch.ones(n, device=images.device)
    lam = torch.distributions.Beta(alpha, alpha).sample((n,))
    cut = (1 - lam).sqrt()
    cy, cx = torch.randint(0, h, (n,)), torch.randint(0, w, (n,))
    y0, y1 = (cy - cut * h / 2).round().clamp(0, h).long(), (cy + cut * h / 2).round().clamp(0, h).long()
    x0, x1 = (cx - cut * w / 2).round().clamp(0, w).long(), (cx + cut * w / 2).round().clamp(0, w).long()
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    box = ((rows >= y0.view(-1, 1, 1)) & (rows < y1.view(-1, 1, 1))
           & (cols >= x0.view(-1, 1, 1)) & (cols < x1.view(-1, 1, 1)))                      # (B, H, W)
    perm = torch.randperm(n)
    lam = 1 - box.flatten(1).float().mean(1)
    box, perm = box.unsqueeze(1).to(images.device), perm.to(images.device)
    return torch.where(box, images[perm], images), perm, lam.to(images.device)


def mix(images: torch.Tensor, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's mixing: mixup, cutmix, or (both alphas > 0) one of the two at random, p 0.5 each."""
    use_cutmix = config.cutmix > 0 and (config.mixup <= 0 or torch.rand(()).item() < 0.5)
    return cutmix(images, config.cutmix) if use_cutmix else mixup(images, config.mixup)


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


def distill_loss(models: Models, batch: Batch, config: TrainConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """The "kd" loss of one batch: KD against the online teacher on the same (mixed) view, or against
    the stored logits of the stored view, plus CE. Returns {"loss", "kd"[, "ce"]}."""
    images = batch_to(batch.images, device, config.channels_last)
    if models.teacher is None:  # stored logits (resolved() ensures: no augmentation, no mixup)
        n = images.shape[0]
        perm, lam = torch.arange(n, device=device), torch.ones(n, device=device)
        teacher_logits = batch.logits.to(device, non_blocking=True)
    else:
        images, perm, lam = mix(images, config)
        with torch.no_grad(), autocast(config.amp, device):
            if config.teacher_view == "native" and batch.resolution is not None:
                teacher_logits = native_view_logits(models.teacher, models.teacher_spec, images,
                                                    batch.resolution.to(device), perm)
            else:
                teacher_logits = models.teacher(models.teacher_spec.normalize(images))
    with autocast(config.amp, device):
        student_logits = models.model(models.student.input_spec.normalize(images))
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    loss = kd_loss(student_logits, teacher_logits, config.temperature)
    terms = {"kd": loss}
    if config.ce_weight > 0:
        labels, smoothing = batch.labels.to(device), config.label_smoothing
        ce = (lam * F.cross_entropy(student_logits, labels, reduction="none", label_smoothing=smoothing)
              + (1 - lam) * F.cross_entropy(student_logits, labels[perm], reduction="none",
                                            label_smoothing=smoothing)).mean()
        terms["ce"] = config.ce_weight * ce
        loss = loss + terms["ce"]
    return {"loss": loss} | terms


LossFn = Callable[[Models, Batch, TrainConfig, torch.device], dict[str, torch.Tensor]]
LOSSES: dict[str, LossFn] = {"kd": distill_loss}
if tuple(LOSSES) != LOSS_NAMES:  # `--loss` offers LOSS_NAMES: a loss named in one file only is a bug
    raise ImportError(f"distill/losses.py implements {list(LOSSES)}, distill/loss_names.py names {list(LOSS_NAMES)}: "
                      "list every loss in both, in the same order")

