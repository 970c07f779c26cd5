"""What a model expects as input: `InputSpec` (channels, size, mean, std, classes).

Both the model registry (common/models.py, `model.input_spec`) and the shard contract (common/shards/,
the teacher's spec in every manifest) use it; it imports neither, nor torch (the shard writer processes
run without it): `normalize` works on the tensor it is given.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # annotations only
    import torch

INPUT_SPEC_FIELDS = ("channels", "size", "mean", "std", "num_classes")
# class count -> (mean, std) of the shared CIFAR-10 / CIFAR-100 teacher bundle (Fast-Datafree's training
# normalisation, reused by CMI and NAYER): what its teachers expect, and how the recipe choice recognises them
CIFAR_BUNDLE_STATS = {10: ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
                      100: ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))}


@dataclass(frozen=True)
class InputSpec:
    """What a model expects: `channels` x `size` x `size` images normalised with mean/std."""

    channels: int
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        try:
            return cls(int(d["channels"]), int(d["size"]), tuple(float(v) for v in d["mean"]),
                       tuple(float(v) for v in d["std"]), int(d["num_classes"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"malformed input spec {d!r}: {e}") from None

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] (B, C, H, W) -> the model's normalised input."""
        mean = x.new_tensor(self.mean).view(1, -1, 1, 1)
        std = x.new_tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std
