"""Student-side augmentations and batch mixing, on tensors: the one table of augmentations by name
(`AUGMENTATIONS`: `distill train --aug`'s choices and help, `distill teacher --aug`'s too) and the
mixing of image pairs (mixup, cutmix) that the online teacher labels.

An augmentation works on a batch (B, C, H, W) of uint8 pixels (the data pipeline's, inside its workers)
or floats in [0, 1], each image its own draw. Adding one is one entry in AUGMENTATIONS: its help and a
function (x, px, fill) -> x, where px is the shift or crop padding (size/8) and fill the value of
uncovered pixels.

Mixing (`Mixing`, from --mixup and --cutmix) runs in the training step on the device: it returns the
mixed images, each image's partner (perm) and the share of its own pixels (lam), which the loss uses to
weigh the pair of stored labels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dfkd.common.errors import UserError


# --------------------------------------------------------------------------- augmentations
def pad_random_crop(x: torch.Tensor, pad: int, mode: str = "constant") -> torch.Tensor:
    """Pad each side of (B, C, H, W) by `pad` and crop an H x W window at a random offset per image."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    top = torch.randint(0, 2 * pad + 1, (b,))
    left = torch.randint(0, 2 * pad + 1, (b,))
    # one slice per image: far cheaper than a gather with per-pixel indices at 64 px and more
    return torch.stack([padded[i, :, t:t + h, l:l + w] for i, (t, l) in enumerate(zip(top.tolist(), left.tolist()))])


def random_translate(x: torch.Tensor, max_shift: int, fill: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Shift each image of (B, C, H, W) by up to `max_shift` px in x and y; uncovered pixels get `fill`."""
    if isinstance(fill, (int, float)) and fill == 0:
        return pad_random_crop(x, max_shift)  # uint8 too, and no two extra passes over the batch
    return pad_random_crop(x - fill, max_shift) + fill


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad random crop of (B, C, H, W), no flip (digits on photographs: MNIST-M)."""
    return pad_random_crop(x, pad, mode="reflect")


def random_crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad random crop plus horizontal flip with p = 0.5 (natural images) of (B, C, H, W)."""
    x = pad_random_crop(x, pad, mode="reflect")
    flip = torch.rand(x.shape[0]) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


def colour_jitter(x: torch.Tensor, strength: float = 0.4) -> torch.Tensor:
    """Per-image brightness, contrast and (3 channels) saturation, each a factor drawn uniformly from
    [1 - strength, 1 + strength], applied in an order drawn per batch, of (B, C, H, W) uint8
    pixels or floats in [0, 1]; the result keeps the input's dtype and range."""
    as_uint8 = x.dtype == torch.uint8
    y = x.float() / 255 if as_uint8 else x.float()
    b, c = y.shape[:2]

    def factor():
        return torch.empty(b, 1, 1, 1).uniform_(1 - strength, 1 + strength)

    def grey(t):
        return t if c != 3 else (0.299 * t[:, 0:1] + 0.587 * t[:, 1:2] + 0.114 * t[:, 2:3])

    def toward(t, target):   # blend each image with `target` by its own factor (1: unchanged)
        return (t - target) * factor() + target

    ops = [lambda t: t * factor(),                                              # brightness
           lambda t: toward(t, grey(t).mean((1, 2, 3), keepdim=True))]          # contrast
    if c == 3:
        ops.append(lambda t: toward(t, grey(t)))                                  # saturation
    for i in torch.randperm(len(ops)).tolist():
        y = ops[i](y).clamp_(0, 1)
    return (y * 255).round_().to(torch.uint8) if as_uint8 else y.to(x.dtype)


def random_crop_colour(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflect-pad random crop (no flip) plus per-image colour jitter (colour_jitter) of (B, C, H, W)."""
    return colour_jitter(random_crop(x, pad))


@dataclass(frozen=True)
class Augment:
    """One entry of AUGMENTATIONS: what it does (the help of --aug) and how ((x, px, fill) -> x; None: the
    image as it is)."""

    help: str
    apply: Callable[[torch.Tensor, int, float | torch.Tensor], torch.Tensor] | None


# the one table of augmentations by name (the student's, the teacher trainer's): --aug's choices and help
AUGMENTATIONS: dict[str, Augment] = {
    "none": Augment("the stored image", None),
    "translate": Augment("shift up to size/8 px", random_translate),
    "crop": Augment("reflect-pad crop by size/8 px, no flip: MNIST-M", lambda x, px, fill: random_crop(x, px)),
    "crop-flip": Augment("the crop and a horizontal flip: natural images", lambda x, px, fill: random_crop_flip(x, px)),
    "crop-colour": Augment("the crop plus per-image brightness, contrast and saturation jitter, the teacher "
                           "labelling the jittered view", lambda x, px, fill: random_crop_colour(x, px)),
}


def described() -> str:
    """`name (what it does)` of every augmentation, for --aug's help."""
    return ", ".join(f"{name} ({entry.help})" for name, entry in AUGMENTATIONS.items())


def augmentation(name: str, size: int, translate: int | None = None, fill: float | torch.Tensor = 0.0):
    """The augmentation `name` (a key of AUGMENTATIONS) of a batch (B, C, H, W) of `size` px images, or None
    for none: translate shifts by up to `translate` px (default size/8; 0 px: None), uncovered pixels
    `fill`; the others pad or crop by size/8 px."""
    if name not in AUGMENTATIONS:
        raise UserError(f"unknown augmentation '{name}'; use one of {', '.join(AUGMENTATIONS)}")
    px = translate if name == "translate" and translate is not None else max(1, size // 8)
    apply = AUGMENTATIONS[name].apply
    if apply is None or px == 0:
        return None
    return lambda x: apply(x, px, fill)


def train_augmentation(name: str, size: int, translate: int = 2):
    """A real-data training augmentation of a uint8 batch (B, C, H, W) by name, or None (`augmentation`
    with a shift of `translate` px, black fill)."""
    return augmentation(name, size, translate)


# --------------------------------------------------------------------------- batch mixing
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


@dataclass(frozen=True)
class Mixing:
    """The batch mixing of a run: mixup (alpha `mixup`), cutmix (alpha `cutmix`), or (both > 0) one of the
    two at random per batch, p 0.5 each; both 0: the batch as it is (and no random draw)."""

    mixup: float = 0.0
    cutmix: float = 0.0

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mixed images, perm, lam): image i blended with image perm[i], lam its own share."""
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or torch.rand(()).item() < 0.5)
        return cutmix(images, self.cutmix) if use_cutmix else mixup(images, self.mixup)
