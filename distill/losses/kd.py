"""The "kd" loss: KL(softmax(t/T) || softmax(s/T)) * T^2 against the teacher's logits (the online
teacher's on the same, maybe mixed, view, or those stored in the shards), plus ce_weight * CE on the
stored labels (term "ce", only with ce_weight > 0), with optional label smoothing and the lam-weighted
pair of labels of mixup or cutmix."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfkd.common.errors import UserError
from dfkd.common.options import below_one, option, positive, validate

from .base import Logits, Loss

GROUP = "Loss and regularisation"


@dataclass
class KDConfig:
    temperature: float = option(4.0, group=GROUP, check=positive, help="KD temperature T.")
    ce_weight: float = option(0.0, group=GROUP, min=0,
                              help="Weight of cross-entropy on the stored labels, added to the KD loss.")
    label_smoothing: float = option(0.0, group=GROUP, min=0, check=below_one,
                                    help="Label smoothing of the CE term (needs --ce-weight > 0).")

    def validate(self) -> None:
        validate(self)
        if self.label_smoothing > 0 and self.ce_weight == 0:
            raise UserError("--label-smoothing smooths the CE term: also pass --ce-weight > 0")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch (Hinton et al. 2015)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


class KD(Loss):
    """Returns {"loss", "kd"[, "ce"]}."""

    name = "kd"
    Config = KDConfig

    def __call__(self, logits: Logits) -> dict[str, torch.Tensor]:
        config = self.config
        loss = kd_loss(logits.student, logits.teacher, config.temperature)
        terms = {"kd": loss}
        if config.ce_weight > 0:
            labels, perm, lam, smoothing = logits.labels, logits.perm, logits.lam, config.label_smoothing
            ce = (lam * F.cross_entropy(logits.student, labels, reduction="none", label_smoothing=smoothing)
                  + (1 - lam) * F.cross_entropy(logits.student, labels[perm], reduction="none",
                                                label_smoothing=smoothing)).mean()
            terms["ce"] = config.ce_weight * ce
            loss = loss + terms["ce"]
        return {"loss": loss} | terms
