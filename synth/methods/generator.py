"""Generator ensemble (Luo et al. 2020, "Large-Scale Generative Data-Free Distillation").

K class-conditional generators are trained, one after the other, against the frozen teacher; then
each shard samples all of them. Per training step, for a class-balanced batch of labels y and
noise z, images x = G_k(z, y) in [0, 1] are normalised for the teacher and

    loss = bn_weight        * sum_l ||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2
         + ce_weight        * CE(teacher(x), y)                       (the image shows class y)
         + balance_weight   * sum_c p_c log p_c, p = mean softmax       (no class collapse; DAFL)
         + diversity_weight * -mean_i |x_i - x_j|_1 / |z_i - z_j|_1     (no mode collapse inside a
                                                                       class: mode seeking, same y)
         + feature_diversity_weight * -mean_i (1 - cos(f_i, f_j)) / |z_i - z_j|_1   (the same on the
                                                                       teacher's penultimate features)
         + adversarial_weight * -mean_i [argmax s(x_i) = argmax t(x_i)] KL(t(x_i) || s(x_i))
                                                                      (optional, Fast-DFKD/CMI's masked
                                                                       disagreement: hard samples for a
                                                                       proxy student s trained alongside
                                                                       by KD on the same images)

Generator (after Luo et al.'s public code): concat(z, embed(y)) -> linear -> init x init x 2w ->
BN -> LeakyReLU -> n x (nearest x2, conv3x3, BN, LeakyReLU) -> conv3x3 -> sigmoid.
Our choices (not in the paper, which does not publish them): a learned class embedding instead of a
one-hot, a sigmoid to [0, 1] pixels (so the stored PNG is exactly what the teacher saw, up to 8-bit
quantisation) instead of tanh + a final BN, the diversity and adversarial terms, and all weights.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.bn_stats import BNStatsLoss
from common.errors import UserError
from common.faults import fault_point
from common.fileio import load_torch_safely, save_torch_atomic
from common.models import InputSpec, create_model

from .base import SynthesisMethod, seeded_generator


@dataclass
class GeneratorEnsembleConfig:
    num_generators: int = 4       # K: the ensemble size
    steps: int = 0                # training steps per generator; 0 = auto: 2 x num_images / batch_size,
                                  # clamped to [20, 2000] (a smoke run stays short, a real one trains)
    batch_size: int = 64
    lr: float = 0.01              # Adam(beta1=0.5)
    latent_dim: int = 64
    width: int = 32               # channels of the last stage (earlier stages: 2 x width)
    bn_weight: float = 1.0
    first_bn_weight: float = 1.0  # extra factor on the first BN layer (DeepInversion: 10 on ImageNet)
    ce_weight: float = 1.0
    balance_weight: float = 1.0
    diversity_weight: float = 1.0
    feature_diversity_weight: float = 0.0   # mode seeking on the teacher's penultimate features (cosine)
    adversarial_weight: float = 0.0
    proxy_student: str = "auto"   # used only when adversarial_weight > 0; auto: from the teacher's input
                                  # (`auto_proxy_student`: lenet5_half for 1-channel <= 32 px, ...)
    proxy_lr: float = 1e-3
    checkpoint_every: int = 50
    sample_noise_scale: float = 1.0   # std of z when writing shards (> 1 reaches further from the modes)

    def validate(self) -> None:
        for name in ("num_generators", "batch_size", "latent_dim", "width", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"generator option {name} must be >= 1")
        if self.steps < 0:
            raise UserError("generator option steps must be >= 0 (0 = auto)")

    def for_input(self, spec: InputSpec) -> "GeneratorEnsembleConfig":
        """This config with an `auto` proxy student resolved for a teacher that takes `spec`'s input."""
        if self.proxy_student != "auto":
            return self
        return replace(self, proxy_student=auto_proxy_student(spec))

    def for_images(self, num_images: int) -> "GeneratorEnsembleConfig":
        """This config with `steps` resolved for a dataset of `num_images` images."""
        if self.steps:
            return self
        return replace(self, steps=min(2000, max(20, 2 * num_images // self.batch_size)))


def auto_proxy_student(spec: InputSpec) -> str:
    """A small registry model for the teacher's kind of input (the adversarial term's proxy student):
    lenet5_half for 1-channel images up to 32 px (MNIST-like; the LeNet-5 recipe), cifar_resnet8 for
    other images up to 64 px (CIFAR-like), resnet18 for larger (ImageNet-like) ones."""
    if spec.channels == 1 and spec.size <= 32:
        return "lenet5_half"
    if spec.size <= 64:
        return "cifar_resnet8"
    return "resnet18"


class ConditionalGenerator(nn.Module):
    """(z, y) -> image in [0, 1] of `spec.channels` x `spec.size` x `spec.size`."""

    def __init__(self, spec: InputSpec, latent_dim: int, width: int):
        super().__init__()
        self.num_up = max(2, round(math.log2(spec.size / 8)))
        self.init = math.ceil(spec.size / 2 ** self.num_up)
        self.size = spec.size
        self.embed = nn.Embedding(spec.num_classes, latent_dim)
        self.fc = nn.Linear(2 * latent_dim, 2 * width * self.init ** 2)
        self.bn0 = nn.BatchNorm2d(2 * width)
        blocks = []
        for i in range(self.num_up):
            cin = 2 * width
            cout = width if i == self.num_up - 1 else 2 * width
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                       nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, inplace=True)]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(width, spec.channels, 3, 1, 1)

    def forward(self, z: torch.Tensor, y: torch.Tensor, class_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """class_vectors (B, latent_dim) replace the learned embedding of y when given (MUSE's noisy embeddings)."""
        e = self.embed(y) if class_vectors is None else class_vectors
        h = self.fc(torch.cat([z, e], 1)).view(z.shape[0], -1, self.init, self.init)
        h = self.blocks(F.leaky_relu(self.bn0(h), 0.2))
        if h.shape[-1] != self.size:
            h = F.interpolate(h, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(h))


def mode_seeking_loss(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-mean |x_i - x_j| / |z_i - z_j| over pairs (i, i + B/2) (the training batch gives pairs one label)."""
    half = x.shape[0] // 2
    dx = (x[:half] - x[half:2 * half]).abs().flatten(1).mean(1)
    dz = (z[:half] - z[half:2 * half]).abs().mean(1)
    return -(dx / (dz + 1e-6)).mean()


def feature_mode_seeking_loss(features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-mean (1 - cos(f_i, f_j)) / |z_i - z_j| over pairs (i, i + B/2) of the teacher's penultimate features."""
    half = features.shape[0] // 2
    df = 1 - F.cosine_similarity(features[:half], features[half:2 * half], dim=1)
    dz = (z[:half] - z[half:2 * half]).abs().mean(1)
    return -(df / (dz + 1e-6)).mean()


class PenultimateFeatures:
    """Records the input of the teacher's last linear layer (its penultimate features) on each forward."""

    def __init__(self, model: nn.Module):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UserError(f"{type(model).__name__} has no linear classifier: feature_diversity_weight needs one")
        self.value = None
        self._handle = linears[-1].register_forward_hook(lambda m, inputs, out: setattr(self, "value", inputs[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def masked_disagreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Fast-DFKD / CMI adversarial term: mean over the batch of KL(teacher || student), counted only for
    images where student and teacher agree on the class (argmax); the generator maximises it, so it seeks
    images the student gets wrong without drifting where the two already disagree."""
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float().detach()
    kl = F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1),
                  reduction="none", log_target=True).sum(1)
    return (kl * agree).mean()


def class_balance_loss(logits: torch.Tensor) -> torch.Tensor:
    """Negative entropy of the batch-mean prediction (minimal when classes are used evenly)."""
    p = F.softmax(logits, 1).mean(0)
    return (p * torch.log(p + 1e-8)).sum()


class GeneratorEnsemble(SynthesisMethod):
    """Luo et al. 2020: an ensemble of class-conditional generators trained on teacher BN statistics."""

    name = "generator"
    Config = GeneratorEnsembleConfig

    def __init__(self, config: GeneratorEnsembleConfig, spec: InputSpec):
        super().__init__(config, spec)
        self.generators: list[nn.Module | None] = [None] * self.num_streams   # filled by fit()

    @property
    def num_streams(self) -> int:
        return self.config.num_generators

    def check_teacher(self, teacher: nn.Module) -> None:
        """UserError for a teacher this method cannot train against, before any training (none here)."""

    def fit(self, teacher: nn.Module, state_dir: Path, progress: bool = True, seed: int = 0) -> None:
        self.check_teacher(teacher)
        state_dir.mkdir(parents=True, exist_ok=True)
        for k in range(self.num_streams):
            self._fit_one(k, teacher, state_dir / f"generator-{k:03d}.pt", progress, seed)

    def _new_generator(self, k: int) -> nn.Module:
        """Ensemble member k, freshly initialised (the caller seeds torch)."""
        return ConditionalGenerator(self.spec, self.config.latent_dim, self.config.width)

    def _render(self, k: int, gen: nn.Module, z: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image as generated, image at the teacher's input): both [0, 1]; the same tensor here."""
        x = gen(z, labels)
        return x, x

    def _hooks(self, teacher: nn.Module, stack: contextlib.ExitStack) -> dict:
        """Teacher hooks for the loss terms: BN statistics, and penultimate features if used."""
        hooks = {"bn": stack.enter_context(BNStatsLoss(teacher, self.config.first_bn_weight))}
        if self.config.feature_diversity_weight:
            hooks["features"] = stack.enter_context(PenultimateFeatures(teacher))
        return hooks

    def _extra_loss(self, hooks: dict, logits: torch.Tensor, labels: torch.Tensor,
                    x: torch.Tensor) -> tuple[torch.Tensor | float, dict[str, float]]:
        """Loss terms a subclass adds (none here)."""
        return 0.0, {}

    def fit_parallel(self, teacher, state_dir, progress, seed, rank, world_size, barrier) -> None:
        """Rank r trains generators r, r + N, ... (each is seeded by its index alone, so the ensemble is
        the one a single process trains); after a barrier every rank loads the others' checkpoints.
        Subclasses put checks in `check_teacher`; one that overrides `fit` gets the default: rank 0 fits."""
        if world_size == 1 or type(self).fit is not GeneratorEnsemble.fit:
            return super().fit_parallel(teacher, state_dir, progress, seed, rank, world_size, barrier)
        self.check_teacher(teacher)
        state_dir.mkdir(parents=True, exist_ok=True)
        paths = [state_dir / f"generator-{k:03d}.pt" for k in range(self.num_streams)]
        for k in range(rank, self.num_streams, world_size):
            self._fit_one(k, teacher, paths[k], progress, seed)
        barrier()
        for k in range(self.num_streams):
            if k % world_size != rank:
                self._fit_one(k, teacher, paths[k], False, seed)

    def _fit_one(self, k: int, teacher: nn.Module, path: Path, progress: bool, seed: int) -> None:
        cfg, spec = self.config, self.spec
        torch.manual_seed(seeded_generator(seed, k).initial_seed())
        gen = self._new_generator(k)
        opt = torch.optim.Adam(gen.parameters(), cfg.lr, betas=(0.5, 0.999))
        proxy = proxy_opt = None
        if cfg.adversarial_weight > 0:
            proxy = create_model(cfg.proxy_student, num_classes=spec.num_classes, in_chans=spec.channels,
                                 input_size=spec.size)
            proxy_opt = torch.optim.Adam(proxy.parameters(), cfg.proxy_lr)
        start = 0
        if path.exists():
            start = self._restore(path, gen, opt, proxy, proxy_opt)
        if start < cfg.steps:
            half = max(1, cfg.batch_size // 2)  # image i and i + half share a label (mode-seeking pairs)
            labels = torch.arange(cfg.batch_size) % half % spec.num_classes
            gen.train()
            bar = tqdm(range(start, cfg.steps), desc=f"{self.name} {k + 1}/{self.num_streams}",
                       initial=start, total=cfg.steps, disable=not progress, leave=False)
            with contextlib.ExitStack() as stack:
                hooks = self._hooks(teacher, stack)
                for step in bar:
                    z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=seeded_generator(seed, k, step))
                    try:
                        terms = self._step(k, gen, opt, teacher, hooks, proxy, proxy_opt, z, labels,
                                           seeded_generator(seed, k, step, 1))
                    except FloatingPointError as e:
                        kept = f"its last checkpoint {path} is kept" if path.exists() else "no checkpoint was written"
                        raise UserError(f"{self.name} {k + 1} diverged at step {step + 1} ({e}); {kept}. Lower "
                                        "--set lr=... (or the loss weights) and rerun with --overwrite or another "
                                        "--out") from None
                    fault_point("generator-step")
                    if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                        self._save(path, gen, opt, proxy, proxy_opt, step + 1)
                    bar.set_postfix({k_: f"{v:.3f}" for k_, v in terms.items()})
        self._restore(path, gen)
        self.generators[k] = gen.eval()

    def _restore(self, path: Path, gen, opt=None, proxy=None, proxy_opt=None) -> int:
        """Load a training checkpoint (tensors only, weights_only=True) into the given objects; its step."""
        fix = "delete it to retrain that generator, or rerun with --overwrite"
        state = load_torch_safely(path, fix)
        if not isinstance(state, dict) or state.get("config") != asdict(self.config):
            raise UserError(f"{path} was trained with another configuration; use --overwrite to start over")
        try:
            gen.load_state_dict(state["generator"])
            if opt is not None:
                opt.load_state_dict(state["optimizer"])
            if proxy is not None:
                proxy.load_state_dict(state["proxy"])
                proxy_opt.load_state_dict(state["proxy_optimizer"])
            return int(state["step"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"{path} does not hold a checkpoint of this generator ({type(e).__name__}); "
                            f"{fix}") from None

    def _step(self, k, gen, opt, teacher, hooks, proxy, proxy_opt, z, labels, step_rng) -> dict[str, float]:
        cfg, spec = self.config, self.spec
        x_native, x = self._render(k, gen, z, labels, step_rng)
        logits = teacher(spec.normalize(x))
        bn = hooks["bn"].loss()
        ce = F.cross_entropy(logits, labels)
        loss = cfg.bn_weight * bn + cfg.ce_weight * ce
        terms = {"bn": bn.item(), "ce": ce.item()}
        if cfg.balance_weight:
            loss = loss + cfg.balance_weight * class_balance_loss(logits)
        if cfg.diversity_weight:
            div = mode_seeking_loss(x_native, z)
            loss = loss + cfg.diversity_weight * div
            terms["div"] = div.item()
        if cfg.feature_diversity_weight:
            fdiv = feature_mode_seeking_loss(hooks["features"].value, z)
            loss = loss + cfg.feature_diversity_weight * fdiv
            terms["fdiv"] = fdiv.item()
        extra, extra_terms = self._extra_loss(hooks, logits, labels, x)
        loss = loss + extra
        terms.update(extra_terms)
        if proxy is not None:
            proxy.eval()
            adv = masked_disagreement(proxy(spec.normalize(x)), logits)
            loss = loss - cfg.adversarial_weight * adv
            terms["adv"] = adv.item()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if proxy is not None:  # the proxy student learns the teacher on the new images
            proxy.train()
            xd = x.detach()
            kd = F.kl_div(F.log_softmax(proxy(spec.normalize(xd)), 1), F.log_softmax(logits.detach(), 1),
                          reduction="batchmean", log_target=True)
            proxy_opt.zero_grad(set_to_none=True)
            kd.backward()
            proxy_opt.step()
        return terms

    def _save(self, path, gen, opt, proxy, proxy_opt, step) -> None:
        state = {"config": asdict(self.config), "step": step, "generator": gen.state_dict(),
                 "optimizer": opt.state_dict()}
        if proxy is not None:
            state["proxy"] = proxy.state_dict()
            state["proxy_optimizer"] = proxy_opt.state_dict()
        save_torch_atomic(path, state)

    @torch.no_grad()
    def synthesize(self, labels: torch.Tensor, streams: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(labels.shape[0], self.config.latent_dim, generator=generator) * self.config.sample_noise_scale
        out = torch.empty(labels.shape[0], self.spec.channels, self.spec.size, self.spec.size)
        for k in streams.unique().tolist():
            idx = (streams == k).nonzero().squeeze(1)
            out[idx] = self._stored_view(*self._render(k, self.generators[k], z[idx], labels[idx], generator))
        return out

    def _stored_view(self, native: torch.Tensor, teacher_view: torch.Tensor) -> torch.Tensor:
        """The image written to the shards, from the two outputs of `_render` (here: the teacher's view)."""
        return teacher_view
