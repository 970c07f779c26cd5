"""BatchNorm-statistics matching (DeepInversion / Luo et al.): hooks that compare each BN layer's
batch statistics of its *input* with the running statistics the teacher stored during training.

    with BNStatsLoss(teacher) as bn:
        logits = teacher(x)
        loss = bn.loss()          # sum over layers of ||mu - running_mean||_2 + ||var - running_var||_2

Several generators can share one teacher pass: with `bn.chunks = K` the batch is K equal chunks (one
per generator) and `loss()` returns the K per-chunk losses, each over its own images only, computed
exactly as a pass of that chunk alone would.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dfkd.common.errors import UserError

from .hooks import ForwardHooks


class BNStatsLoss(ForwardHooks):
    """Forward hooks on every BatchNorm of `model`; `loss()` reads what the last forward recorded.

    Per layer l: ||mean_l - running_mean_l||_2 + ||var_l - running_var_l||_2, with the batch mean and
    biased variance over (N, H, W) of the layer input. `first_layer_weight` scales layer 0 (DeepInversion
    uses 10 on ImageNet).
    """

    def __init__(self, model: nn.Module, first_layer_weight: float = 1.0):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not self.layers:
            name = getattr(model, "arch", type(model).__name__)
            raise UserError(f"teacher {name} has no BatchNorm layers: the generator, muse and deepinversion methods "
                            "match the batch statistics its BatchNorm layers stored during training, so they need "
                            "a teacher with BatchNorm (most CNNs: ResNet, MobileNet, EfficientNet, ...; not "
                            "LayerNorm/GroupNorm models such as ViTs, ConvNeXt); use --method noise or another teacher")
        self.first_layer_weight = first_layer_weight
        self.per_layer: list[torch.Tensor | None] = [None] * len(self.layers)
        self.chunks = 1   # > 1: the batch is this many equal chunks, each matched on its own
        self.hooks(self.layers, lambda i, m: self._make_hook(i))

    def _make_hook(self, index: int):
        def distance(module, x):
            x = x.float()   # statistics in float32 under autocast (a no-op for float32 inputs)
            dims = [0] + list(range(2, x.dim()))
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, unbiased=False)
            return (torch.linalg.vector_norm(mean - module.running_mean)
                    + torch.linalg.vector_norm(var - module.running_var))

        def hook(module, inputs, output):
            x = inputs[0]
            if self.chunks == 1:
                self.per_layer[index] = distance(module, x)
            else:
                self.per_layer[index] = torch.stack([distance(module, c) for c in x.chunk(self.chunks)])
        return hook

    def loss(self) -> torch.Tensor:
        """The weighted sum over layers: a scalar, or (chunks,) per-chunk losses when chunks > 1."""
        if any(v is None for v in self.per_layer):
            raise RuntimeError("BNStatsLoss.loss() called before a forward pass of the hooked model")
        total = self.per_layer[0] * self.first_layer_weight
        for v in self.per_layer[1:]:
            total = total + v
        return total
