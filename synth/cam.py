"""Class Activation Maps of a frozen CNN teacher, differentiable with respect to its input.

    with ClassActivationMaps(teacher) as cams:
        logits = teacher(x)
        cam = cams.maps(logits, labels)      # (B, h, w), >= 0, differentiable w.r.t. x

The feature map A (B, K, h, w) is the output of the last leaf module (in forward order) that returns a
4-D tensor larger than 1 x 1 and is not a pooling layer: for torchvision ResNets the last ReLU of
layer4, for MobileNets the last conv block, for our CIFAR ResNets the last ReLU before the global pool.
Where the last map is 1 x 1 (our LeNet-5 at 28 px: 28 -> 14 -> 10 -> 5 -> 1; a ResNet-50 at 32 px) the
map comes from the last larger layer (LeNet-5: the 10 x 10 ReLU after conv2). Then

    alpha_k = mean_ij d logit_y / d A_kij   (detached)       cam_y = relu(sum_k alpha_k A_k)

For a global-average-pool + linear head (ResNets, MobileNets, CIFAR ResNets) alpha_k = W[y, k] / (h w)
exactly, so this is the CAM of Zhou et al. 2016 (up to the constant 1 / (h w)). For any other head
(our LeNet-5's two-layer MLP) it is Grad-CAM (Selvaraju et al. 2017), the documented fallback. The
channel weights are detached, so the map's gradient flows only through A (no second derivatives).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd.common.errors import UserError

from .hooks import ForwardHooks

_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


class ClassActivationMaps(ForwardHooks):
    """Forward hooks on the leaf modules of `model`; `maps()` reads the last feature map they saw."""

    def __init__(self, model: nn.Module):
        self.model_name = type(model).__name__
        self.features: torch.Tensor | None = None
        leaves = [m for m in model.modules() if not list(m.children()) and not isinstance(m, _POOLS)]
        self.hooks(leaves, lambda i, m: self._record)

    def _record(self, module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1:
            self.features = output

    def maps(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CAM of class labels[i] for image i of the last forward: (B, h, w), non-negative."""
        a = self.features
        if a is None or not a.requires_grad:
            raise UserError(f"{self.model_name} produced no 4-D feature map with a gradient path; class "
                            "activation maps need a convolutional teacher (set cam_weight=0 for this teacher)")
        score = logits.gather(1, labels.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, a, retain_graph=True)
        alpha = grad.mean(dim=(2, 3), keepdim=True).detach()
        return F.relu((alpha * a).sum(1))


def cam_coverage(cam: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per image, the mean of the CAM divided by its maximum: the fraction of the image that carries
    evidence for the target class (1 = everywhere as strong as the peak, -> 0 = one small spot)."""
    flat = cam.flatten(1)
    return flat.mean(1) / (flat.amax(1) + eps)
