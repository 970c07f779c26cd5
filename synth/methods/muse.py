"""MUSE (Tran et al. 2024, "Large-Scale Data-Free Knowledge Distillation for ImageNet via Multi-Resolution
Data Generation"), as far as it is public: low-resolution generation, multi-resolution generation, a
Class Activation Map loss and embedding diversity, on top of our generator ensemble.

The paper's body and code are not available to us; the abstract and a third-party review give the
parts, and every formula below is ours. Per stream k (one generator per resolution and member):

    resolution  l_k = round(scale_k * S)           S: the teacher's input size; scales default 1/4, 1/2, 1
    input       u_i = e_{y_i} + embedding_noise * R_i e_{y_i}       the "noisy layer" (embedding diversity):
                R_i (D x D) has N(0, 1/D) entries, drawn afresh for every image, at training steps and
                when writing shards; e_y are fixed class embeddings (`embedding`: random orthogonal rows
                scaled to norm sqrt(D), learned, or a (C, D') .npy file of e.g. text embeddings, projected
                to D by a fixed random matrix)
    image       x_i = G_k(z_i, u_i)  in [0, 1], l_k x l_k; the teacher sees
                up(x_i) = interpolate(x_i, S, mode=upsample_mode, align_corners=False)
                (`teacher_input=upsampled`, default) or x_i itself (`teacher_input=native`: cheaper, needs
                a teacher that takes l_k px, e.g. any ResNet; BN statistics are then those of a smaller view)
    loss        the generator ensemble's terms (BN statistics, CE, class balance, pixel and feature mode
                seeking; see generator.py), computed on the teacher's view, plus
                cam_weight * (1 - mean_i coverage(CAM_{y_i}(x_i)))
                with coverage = mean / max of the target class's CAM (synth/cam.py: CAM for GAP + linear
                heads, Grad-CAM otherwise): the class evidence must fill the image instead of sitting in a
                few pixels, which is what keeps a low-resolution image class-specific.

Shards always hold images at the teacher's size S (low-resolution streams upsampled with the same
mode), so every student reads one input size; each sample's JSON records its native `resolution`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd.common.errors import UserError
from dfkd.common.input_spec import InputSpec
from dfkd.common.options import option

from ..cam import ClassActivationMaps, cam_coverage
from .base import require_input_size
from .generator import ConditionalGenerator, GeneratorEnsemble, GeneratorEnsembleConfig

UPSAMPLE_MODES = ("nearest", "bilinear", "bicubic")
TEACHER_INPUTS = ("upsampled", "native")


def _check_scales(scales: tuple) -> str | None:
    if not scales or any(not 0 < s <= 1 for s in scales):
        return "must be fractions in (0, 1], e.g. scales=0.25,0.5,1"
    return None


def _check_embedding(source: str) -> str | None:
    if source not in ("orthogonal", "learned") and not Path(source).is_file():
        return f"must be orthogonal, learned or an existing .npy file, not {source!r}"
    return None


@dataclass
class MuseConfig(GeneratorEnsembleConfig):
    OPTION_LABEL = "muse option"

    num_generators: int = option(1, min=1, help="Generators per resolution (streams = scales x num_generators).")
    scales: tuple[float, ...] = option((0.25, 0.5, 1.0), check=_check_scales,
                                       help="Output resolutions as fractions of the teacher's input size.")
    upsample_mode: str = option("bilinear", choices=UPSAMPLE_MODES,
                                help="How low-resolution images are brought to the teacher's size.")
    teacher_input: str = option("upsampled", choices=TEACHER_INPUTS,
                                help="What the teacher sees in training: upsampled images, or native ones "
                                "(cheaper; needs a teacher that takes smaller inputs, e.g. any ResNet).")
    cam_weight: float = option(1.0, min=0.0, help="Weight of the CAM coverage term (class evidence fills "
                               "the image).")
    embedding: str = option("orthogonal", check=_check_embedding,
                            help="Class embeddings: orthogonal, learned, or the path of a (classes, dim) float "
                            ".npy file (e.g. text embeddings).")
    embedding_noise: float = option(0.5, min=0.0, help="Strength of the per-image noisy layer on the class "
                                    "embedding; 0 = plain class embedding.")
    diversity_weight: float = option(20.0, min=0.0, help="Weight of pixel mode seeking (as for the generator "
                                     "ensemble).")
    feature_diversity_weight: float = option(10.0, min=0.0, help="Weight of feature mode seeking (as for the "
                                             "generator ensemble).")


def class_embeddings(source: str, num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(num_classes, dim) class vectors of norm sqrt(dim) from `source` (see the module docstring)."""
    rng = torch.Generator().manual_seed(seed)
    if source in ("orthogonal", "learned"):
        m = torch.randn(max(num_classes, dim), dim, generator=rng)
        q, _ = torch.linalg.qr(m)                   # orthonormal columns; rows orthogonal when classes <= dim
        e = q[:num_classes]
    else:
        try:
            arr = np.load(source, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read class embeddings {source}: {err}; give a float .npy array") from None
        if arr.ndim != 2 or arr.shape[0] != num_classes or not np.issubdtype(arr.dtype, np.floating):
            raise UserError(f"class embeddings {source} must be a float array of shape ({num_classes}, dim), "
                            f"got {arr.dtype} {arr.shape}")
        e = torch.from_numpy(arr.astype(np.float32))
        e = e @ torch.randn(e.shape[1], dim, generator=rng)   # fixed random projection to dim
    return F.normalize(e, dim=1) * dim ** 0.5


def noisy_embeddings(e: torch.Tensor, strength: float, generator: torch.Generator | None) -> torch.Tensor:
    """u_i = e_i + strength * R_i e_i with a fresh R_i ~ N(0, 1/D) per row (the noisy layer)."""
    if strength == 0:
        return e
    b, d = e.shape
    r = (torch.randn(b, d, d, generator=generator) / d ** 0.5).to(e.device)   # drawn on the CPU: seeded bytes
    return e + strength * torch.bmm(r, e.unsqueeze(2)).squeeze(2)


class Muse(GeneratorEnsemble):
    """MUSE: low- and multi-resolution generators with CAM guidance and noisy class embeddings."""

    name = "muse"
    Config = MuseConfig

    def __init__(self, config: MuseConfig, spec: InputSpec):
        self.resolutions = [max(4, round(s * spec.size)) for s in config.scales]
        super().__init__(config, spec)

    @property
    def num_streams(self) -> int:
        return len(self.config.scales) * self.config.num_generators

    def stream_resolution(self, k: int) -> int:
        return self.resolutions[k % len(self.resolutions)]

    def _new_generator(self, k: int) -> nn.Module:
        cfg, spec = self.config, self.spec
        size = self.stream_resolution(k)
        gen = ConditionalGenerator(InputSpec(spec.channels, size, spec.mean, spec.std, spec.num_classes),
                                   cfg.latent_dim, cfg.width)
        e = class_embeddings(cfg.embedding, spec.num_classes, cfg.latent_dim)
        gen.embed.weight.data.copy_(e)
        gen.embed.weight.requires_grad_(cfg.embedding == "learned")
        return gen

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.spec.size:
            return x
        mode = self.config.upsample_mode
        up = F.interpolate(x, size=(self.spec.size, self.spec.size), mode=mode,
                           **({} if mode == "nearest" else {"align_corners": False}))
        return up.clamp(0, 1)

    def _render(self, k, gen, z, labels, generator):
        u = noisy_embeddings(gen.embed(labels), self.config.embedding_noise, generator)
        x = gen(z, labels, class_vectors=u)
        return x, (x if self.config.teacher_input == "native" else self._upsample(x))

    def _hooks(self, teacher: nn.Module, stack: contextlib.ExitStack) -> dict:
        hooks = super()._hooks(teacher, stack)
        if self.config.cam_weight:
            hooks["cam"] = stack.enter_context(ClassActivationMaps(teacher))
        return hooks

    def _extra_loss(self, hooks, logits, labels, chunks):
        if not self.config.cam_weight:
            return None, {}
        coverage = cam_coverage(hooks["cam"].maps(logits, labels))
        coverage = coverage.mean().reshape(1) if chunks == 1 else torch.stack([c.mean() for c in coverage.chunk(chunks)])
        return self.config.cam_weight * (1 - coverage), {"cam": coverage}

    def _view_size(self, k: int) -> int:
        return self.stream_resolution(k) if self.config.teacher_input == "native" else self.spec.size

    def check_teacher(self, teacher: nn.Module) -> None:
        if self.config.teacher_input == "native":
            for size in sorted(set(self.resolutions)):
                require_input_size(teacher, self.spec.channels, size,
                                   "use teacher_input=upsampled or larger scales (teacher_input=native)")

    def _stored_view(self, native: torch.Tensor, teacher_view: torch.Tensor) -> torch.Tensor:
        return self._upsample(native)   # shards hold the teacher's size, whatever the teacher saw
