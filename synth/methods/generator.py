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
         + contrastive_weight * InfoNCE(h(f(x_i)), h(f(crop(x_i))))     (optional, CMI's contrastive term:
                                                                       each image told apart from the batch's
                                                                       others through a projection head h
                                                                       trained alongside; see below)
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

The contrastive term (after Fang et al. 2021, CMI): the teacher also sees a random resized crop (flipped at
random) of each image; h (linear, ReLU, linear to 128, L2-normalised) maps the penultimate features of both
views, and the loss is the cross-entropy of picking image i's crop among the batch's crops at temperature
0.1, both ways. h is a part of the generator (trained by the same optimiser, kept in its checkpoint, unused
when sampling). Our simplifications: negatives from the generator's batch only (CMI also keeps a memory
bank of earlier images), and the penultimate features only (CMI concatenates BN layers' features).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from dfkd.common.accel import compile_module, grad_scaler
from dfkd.common.errors import UserError
from dfkd.common.faults import fault_point
from dfkd.common.fileio import load_torch_safely, save_torch_atomic
from dfkd.common.input_spec import InputSpec
from dfkd.common.models import create_model
from dfkd.common.options import declared_defaults, differences, hashed, option
from dfkd.common.options import validate as validate_options

from ..bn_stats import BNStatsLoss
from .base import SynthesisMethod, seeded_generator


@dataclass
class GeneratorEnsembleConfig:
    OPTION_LABEL = "generator option"

    num_generators: int = option(4, help="K: the ensemble size (generators trained one after the other).", min=1)
    steps: int = option(0, min=0, help="Training steps per generator; 0 = auto: 2 x num_images / "
                        "train_batch_size, clamped to [20, 2000] (a smoke run stays short, a real one trains).")
    train_batch_size: int = option(64, min=1, help="Images per generator training step (class-balanced).")
    lr: float = option(0.01, min=0.0, help="Adam learning rate of the generators (beta1 = 0.5).")
    latent_dim: int = option(64, min=1, help="Length of the noise vector z (and of the class embedding).")
    width: int = option(32, min=1, help="Channels of the generator's last stage (earlier stages: 2 x width).")
    bn_weight: float = option(1.0, min=0.0, help="Weight of the BN-statistics term (match the teacher's "
                              "running means and variances).")
    first_bn_weight: float = option(1.0, min=0.0, help="Extra factor on the first BN layer's term "
                                    "(DeepInversion: 10 on ImageNet).")
    ce_weight: float = option(1.0, min=0.0, help="Weight of the cross-entropy term (the image shows its class).")
    balance_weight: float = option(1.0, min=0.0, help="Weight of the class-balance term (no class collapse; DAFL).")
    diversity_weight: float = option(1.0, min=0.0, help="Weight of pixel mode seeking (no mode collapse inside a "
                                     "class: |x_i - x_j| / |z_i - z_j|).")
    feature_diversity_weight: float = option(0.0, min=0.0, help="Weight of mode seeking on the teacher's "
                                             "penultimate features (cosine distance); 0 = off.")
    contrastive_weight: float = option(0.0, min=0.0, help="Weight of CMI's contrastive term (each image told "
                                       "apart from the batch's others by the teacher's features of a crop of it, "
                                       "through a projection head trained alongside; one more teacher pass per "
                                       "step); 0 = off.")
    adversarial_weight: float = option(0.0, min=0.0, help="Weight of the adversarial term (Fast-DFKD/CMI masked "
                                       "disagreement with a proxy student trained alongside); 0 = off.")
    proxy_student: str = option("auto", help="The proxy student (used only when adversarial_weight > 0); auto: "
                                "from the teacher's input (lenet5_half for 1-channel <= 32 px, cifar_resnet8 up to "
                                "64 px, resnet18 above).")
    proxy_lr: float = option(1e-3, min=0.0, help="Adam learning rate of the proxy student.")
    checkpoint_every: int = option(50, min=1, effect="none", help="Training steps between checkpoints of a "
                                   "generator (a killed run continues from the last one).")
    concurrent_generators: int = option(0, min=0, help="Generators sharing each teacher pass in training; 0 = all "
                                        "(fewer while a GPU runs out of memory); each keeps its own loss.")
    sample_noise_scale: float = option(1.0, min=0.0, help="Std of z when writing shards (> 1 reaches further "
                                       "from the modes).")

    def validate(self) -> None:
        validate_options(self)

    def for_input(self, spec: InputSpec) -> "GeneratorEnsembleConfig":
        """This config with an `auto` proxy student resolved for a teacher that takes `spec`'s input."""
        if self.proxy_student != "auto":
            return self
        return replace(self, proxy_student=auto_proxy_student(spec))

    def for_images(self, num_images: int) -> "GeneratorEnsembleConfig":
        """This config with `steps` resolved for a dataset of `num_images` images."""
        if self.steps:
            return self
        return replace(self, steps=min(2000, max(20, 2 * num_images // self.train_batch_size)))


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


def training_labels(step: int, batch: int, num_classes: int) -> torch.Tensor:
    """The labels of training step `step`'s batch: its first half takes the next `batch // 2` classes in turn,
    starting where the previous step stopped (step x half, modulo the class count), and image i + half repeats
    image i's label (the mode-seeking pairs). Every class is trained: all of them in each step when the half
    batch holds them, in turn over ceil(classes / half) steps when it does not (100 classes at a batch of 100,
    1,000 at 64), and evenly over the steps. Where the half batch is a multiple of the class count (MNIST's 10
    at 200 or 100) every step's batch is 0, 1, ..., C-1, 0, 1, ... as it always was."""
    half = max(1, batch // 2)
    first = (step * half + torch.arange(half)) % num_classes
    return first.repeat(-(-batch // half))[:batch]


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
        self.value = None
        self._handle = self.classifier(model).register_forward_hook(
            lambda m, inputs, out: setattr(self, "value", inputs[0]))

    @staticmethod
    def classifier(model: nn.Module) -> nn.Linear:
        """The model's last linear layer (its input: the penultimate features)."""
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UserError(f"{type(model).__name__} has no linear classifier: feature_diversity_weight and "
                            "contrastive_weight need one (set them to 0)")
        return linears[-1]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


class ProjectionHead(nn.Sequential):
    """The contrastive term's head on the teacher's penultimate features: linear, ReLU, linear to 128."""

    def __init__(self, dim: int, out: int = 128):
        super().__init__(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out))


def random_resized_crops(x: torch.Tensor, generator: torch.Generator, min_area: float = 0.25) -> torch.Tensor:
    """Per image: a square crop of a random area in [min_area, 1] of the image at a random place, flipped
    left-right at random, resized back to the image's size (bilinear; differentiable in x). The draws are
    made on the CPU from `generator` (the same crops on every device)."""
    b = x.shape[0]
    side = torch.sqrt(torch.empty(b).uniform_(min_area, 1.0, generator=generator))
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (1 - side).unsqueeze(1)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def contrastive_loss(head: nn.Module, features: torch.Tensor, crop_features: torch.Tensor,
                     temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE over the batch: image i's crop is the one to pick among all crops for image i (and the other way
    round), on L2-normalised head outputs at `temperature`; ln(batch) when nothing tells images apart."""
    a = F.normalize(head(features), dim=1)
    b = F.normalize(head(crop_features), dim=1)
    logits = a @ b.t() / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


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


@dataclass
class _Member:
    """A generator being trained: its index, checkpoint, modules, optimisers and the step it starts at."""

    k: int
    path: Path
    gen: nn.Module
    opt: torch.optim.Optimizer
    proxy: nn.Module | None
    proxy_opt: torch.optim.Optimizer | None
    start: int
    net: nn.Module | None = None   # what the training step calls: gen, or gen compiled

    def __post_init__(self):
        if self.net is None:
            self.net = self.gen


class GeneratorEnsemble(SynthesisMethod):
    """Luo et al. 2020: an ensemble of class-conditional generators trained on teacher BN statistics."""

    name = "generator"
    Config = GeneratorEnsembleConfig

    def __init__(self, config: GeneratorEnsembleConfig, spec: InputSpec):
        super().__init__(config, spec)
        self.generators: list[nn.Module | None] = [None] * self.num_streams   # filled by fit()
        self._compiled: dict[int, nn.Module] = {}

    @property
    def num_streams(self) -> int:
        return self.config.num_generators

    def training_steps(self) -> int:
        return self.config.steps

    def with_training_steps(self, steps: int) -> "GeneratorEnsemble":
        method = type(self)(replace(self.config, steps=steps), self.spec)
        method.compute = self.compute
        return method

    def check_teacher(self, teacher: nn.Module) -> None:
        """UserError for a teacher this method cannot train against, before any training (none here)."""

    def fit(self, teacher: nn.Module, state_dir: Path, progress: bool = True, seed: int = 0) -> None:
        self._fit_generators(list(range(self.num_streams)), teacher, state_dir, progress, seed)

    def _new_generator(self, k: int) -> nn.Module:
        """Ensemble member k, freshly initialised (the caller seeds torch)."""
        return ConditionalGenerator(self.spec, self.config.latent_dim, self.config.width)

    def _render(self, k: int, gen: nn.Module, z: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image as generated, image at the teacher's input): both [0, 1]; the same tensor here."""
        x = gen(z, labels)
        return x, x

    def _view_size(self, k: int) -> int:
        """The size of the images the teacher sees from generator k (generators of one size share passes)."""
        return self.spec.size

    def _hooks(self, teacher: nn.Module, stack: contextlib.ExitStack) -> dict:
        """Teacher hooks for the loss terms: BN statistics, and penultimate features if used."""
        hooks = {"bn": stack.enter_context(BNStatsLoss(teacher, self.config.first_bn_weight))}
        if self.config.feature_diversity_weight or self.config.contrastive_weight:
            hooks["features"] = stack.enter_context(PenultimateFeatures(teacher))
        return hooks

    def _extra_loss(self, hooks: dict, logits: torch.Tensor, labels: torch.Tensor,
                    chunks: int) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Loss terms a subclass adds, per chunk of the batch ((chunks,) tensors; none here)."""
        return None, {}

    def fit_parallel(self, teacher, state_dir, progress, seed, rank, world_size, barrier) -> None:
        """Rank r trains generators r, r + N, ... (each is seeded by its index alone, so the ensemble is
        the one a single process trains); after a barrier every rank loads the others' checkpoints."""
        if world_size == 1:
            return self.fit(teacher, state_dir, progress=progress, seed=seed)
        mine = list(range(rank, self.num_streams, world_size))
        self._fit_generators(mine, teacher, state_dir, progress, seed)
        barrier()
        others = [k for k in range(self.num_streams) if k not in mine]
        self._fit_generators(others, teacher, state_dir, False, seed)

    def _fit_generators(self, ks: list[int], teacher: nn.Module, state_dir: Path, progress: bool, seed: int) -> None:
        """Train generators `ks` (restartably: each continues from its checkpoint) concurrently, then load them."""
        self.check_teacher(teacher)
        if self.config.contrastive_weight:
            self._feature_dim = PenultimateFeatures.classifier(teacher).in_features
        state_dir.mkdir(parents=True, exist_ok=True)
        members = [self._member(k, state_dir / f"generator-{k:03d}.pt", seed) for k in ks]
        pending = [m for m in members if m.start < self.config.steps]
        if pending:
            self._train(pending, teacher, progress, seed)
        for m in members:
            self._restore(m.path, m.gen)
            self.generators[m.k] = m.gen.eval()

    def _member(self, k: int, path: Path, seed: int) -> "_Member":
        """Generator k with its optimiser (and proxy student), initialised from its seed alone on the CPU,
        moved to the device, restored from its checkpoint when there is one."""
        cfg, spec, compute = self.config, self.spec, self.compute
        torch.manual_seed(seeded_generator(seed, k).initial_seed())
        gen = self._new_generator(k)
        if cfg.contrastive_weight:   # the projection head trains with the generator and lives in its checkpoint
            gen.add_module("contrast_head", ProjectionHead(self._feature_dim))
        gen = compute.model(gen)
        opt = torch.optim.Adam(gen.parameters(), cfg.lr, betas=(0.5, 0.999))
        proxy = proxy_opt = None
        if cfg.adversarial_weight > 0:
            proxy = compute.model(create_model(cfg.proxy_student, num_classes=spec.num_classes,
                                               in_chans=spec.channels, input_size=spec.size))
            proxy_opt = torch.optim.Adam(proxy.parameters(), cfg.proxy_lr)
        start = self._restore(path, gen, opt, proxy, proxy_opt) if path.exists() else 0
        return _Member(k, path, gen, opt, proxy, proxy_opt, start, compile_module(gen, compute.compile))

    def _train(self, members: list["_Member"], teacher: nn.Module, progress: bool, seed: int) -> None:
        """The training loop of several generators at once. Each step, the generators of one view size
        share one teacher pass (up to `concurrent_generators` of them; 0 = all, halved while a GPU runs out
        of memory); each one's loss is computed over its own images only, so its training is the one it
        would have alone (bit-identical on the CPU, tested)."""
        cfg, compute = self.config, self.compute
        for m in members:
            m.gen.train()
        group = cfg.concurrent_generators or len(members)
        scaler = grad_scaler(compute.amp, compute.device)
        names = f"{members[0].k + 1}" if len(members) == 1 else f"{members[0].k + 1}-{members[-1].k + 1}"
        first = min(m.start for m in members)
        bar = tqdm(range(first, cfg.steps), desc=f"{self.name} {names}/{self.num_streams}", initial=first,
                   total=cfg.steps, disable=not progress, leave=False)
        with contextlib.ExitStack() as stack:
            hooks = self._hooks(teacher, stack)
            net = compile_module(teacher, compute.compile and "cam" not in hooks)  # CAM needs eager (see README)
            for step in bar:
                active = [m for m in members if m.start <= step]
                while True:
                    try:
                        done = [(m, out) for part in self._parts(active, group)
                                for m, out in zip(part, self._forward_backward(part, net, hooks, scaler, seed, step))]
                        break
                    except torch.OutOfMemoryError:
                        if group == 1 or cfg.concurrent_generators:
                            raise UserError(f"out of GPU memory training {group} generator(s) at once with "
                                            f"batch {cfg.train_batch_size}: lower --set "
                                            "concurrent_generators=... or --set train_batch_size=...") from None
                        group = max(1, group // 2)
                        torch.cuda.empty_cache()
                for m, (terms, x, logits) in done:   # in pass order (MUSE groups its streams by view size)
                    scaler.step(m.opt)
                    if m.proxy is not None:
                        self._train_proxy(m, x, logits)
                scaler.update()
                for m in active:
                    fault_point("generator-step")
                    if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                        self._save(m, step + 1)
                if self.on_step is not None and self.on_step(step + 1):   # stop here (timing runs)
                    for m in active:
                        self._save(m, step + 1)
                    break
                if progress and (step % 10 == 0 or step + 1 == cfg.steps):
                    bar.set_postfix({name: f"{v.item():.3f}" for name, v in done[0][1][0].items()})
        if compute.compile:  # the traced hooks must not outlive them: the writing path compiles afresh
            torch._dynamo.reset()

    def _parts(self, active: list["_Member"], group: int) -> list[list["_Member"]]:
        """`active` in teacher passes: same view size, at most `group` generators each, in order."""
        by_size: dict[int, list] = {}
        for m in active:
            by_size.setdefault(self._view_size(m.k), []).append(m)
        return [ms[i:i + group] for ms in by_size.values() for i in range(0, len(ms), group)]

    def _forward_backward(self, part: list["_Member"], teacher: nn.Module, hooks: dict, scaler, seed: int,
                          step: int) -> list[tuple[dict, torch.Tensor, torch.Tensor]]:
        """One teacher pass over the images of the generators in `part`; each generator's loss over its own
        chunk, backpropagated (grads accumulate in each generator). Per generator: (terms, images, logits)."""
        b, n = self.config.train_batch_size, len(part)
        labels = training_labels(step, b, self.spec.num_classes).to(self.compute.device)
        zs, natives, views = self._render_part(part, labels, seed, step)
        logits, bn, extra, extra_terms, features = self._teacher_pass(teacher, hooks, views, labels, n)
        crops = self._crop_pass(teacher, hooks, views, [seeded_generator(seed, m.k, step, 2) for m in part])
        losses, outputs = [], []
        for i, m in enumerate(part):
            loss, terms = self._member_loss(m, labels, logits[i], bn[i], zs[i], natives[i], views[i],
                                            features[i] if features is not None else None,
                                            extra[i] if extra is not None else None,
                                            {name: v[i].detach() for name, v in extra_terms.items()},
                                            crops[i] if crops is not None else None)
            losses.append(loss)
            outputs.append((terms, views[i].detach(), logits[i].detach()))
        total = losses[0] if n == 1 else torch.stack(losses).sum()
        if not torch.isfinite(total):
            self._diverged(part, losses, step)
        scaler.scale(total).backward()
        return outputs

    def _render_part(self, part: list["_Member"], labels: torch.Tensor, seed: int, step: int
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Each generator's latents (seeded by (seed, member, step)), its images at its own resolution and
        as the teacher sees them; the generators' gradients cleared."""
        cfg, compute = self.config, self.compute
        zs, natives, views = [], [], []
        for m in part:
            m.opt.zero_grad(set_to_none=True)
            z = compute.batch(torch.randn(len(labels), cfg.latent_dim, generator=seeded_generator(seed, m.k, step)))
            with compute.autocast():
                x_native, x = self._render(m.k, m.net, z, labels, seeded_generator(seed, m.k, step, 1))
            zs.append(z)
            natives.append(x_native.float())
            views.append(x.float())
        return zs, natives, views

    def _teacher_pass(self, teacher: nn.Module, hooks: dict, views: list[torch.Tensor], labels: torch.Tensor,
                      n: int) -> tuple[list[torch.Tensor], torch.Tensor, Any, dict, Any]:
        """One teacher pass over the `n` generators' images: per generator its logits, its BN-statistics
        loss, the method's extra loss and terms (`_extra_loss`), its penultimate features (or None)."""
        cfg, spec, compute = self.config, self.spec, self.compute
        x_all = views[0] if n == 1 else torch.cat(views)
        hooks["bn"].chunks = n
        with compute.autocast():
            logits_all = teacher(compute.batch(spec.normalize(x_all))).float()
        bn = hooks["bn"].loss().reshape(n)
        extra, extra_terms = self._extra_loss(hooks, logits_all, labels.repeat(n), n)
        features = hooks["features"].value.float().chunk(n) if "features" in hooks else None
        logits = logits_all.chunk(n) if n > 1 else [logits_all]
        return logits, bn, extra, extra_terms, features

    def _crop_pass(self, teacher: nn.Module, hooks: dict, views: list[torch.Tensor],
                   generators: list[torch.Generator]) -> Any:
        """The contrastive term's second teacher pass, after `_teacher_pass` has read its hooks: the penultimate
        features of a random resized crop of every image, per generator (None when the term is off). Each
        generator's crops are drawn from its own seeded stream, so a generator's training does not depend on
        which others share its pass."""
        if not self.config.contrastive_weight:
            return None
        x = torch.cat([random_resized_crops(v, g) for v, g in zip(views, generators)])
        with self.compute.autocast():
            teacher(self.compute.batch(self.spec.normalize(x)))
        return hooks["features"].value.float().chunk(len(views))

    def _member_loss(self, m: "_Member", labels: torch.Tensor, logits: torch.Tensor, bn: torch.Tensor,
                     z: torch.Tensor, native: torch.Tensor, view: torch.Tensor, features: torch.Tensor | None,
                     extra: torch.Tensor | None, extra_terms: dict,
                     crop_features: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """One generator's loss (BN statistics, CE, class balance, mode seeking on pixels and features, the
        method's extra term, the adversarial term against its proxy student) and its terms, detached."""
        cfg, spec, compute = self.config, self.spec, self.compute
        ce = F.cross_entropy(logits, labels)
        loss = cfg.bn_weight * bn + cfg.ce_weight * ce
        terms = {"bn": bn.detach(), "ce": ce.detach()}
        if cfg.balance_weight:
            loss = loss + cfg.balance_weight * class_balance_loss(logits)
        if cfg.diversity_weight:
            div = mode_seeking_loss(native, z)
            loss = loss + cfg.diversity_weight * div
            terms["div"] = div.detach()
        if cfg.feature_diversity_weight:
            fdiv = feature_mode_seeking_loss(features, z)
            loss = loss + cfg.feature_diversity_weight * fdiv
            terms["fdiv"] = fdiv.detach()
        if crop_features is not None:
            con = contrastive_loss(m.gen.contrast_head, features, crop_features)
            loss = loss + cfg.contrastive_weight * con
            terms["con"] = con.detach()
        if extra is not None:
            loss = loss + extra
            terms.update(extra_terms)
        if m.proxy is not None:
            m.proxy.eval()
            with compute.autocast():
                student = m.proxy(compute.batch(spec.normalize(view))).float()
            adv = masked_disagreement(student, logits)
            loss = loss - cfg.adversarial_weight * adv
            terms["adv"] = adv.detach()
        return loss, terms

    def _diverged(self, part: list["_Member"], losses: list[torch.Tensor], step: int) -> None:
        """UserError naming the generator whose loss is NaN/Inf and what is kept."""
        bad = next(i for i, v in enumerate(losses) if not torch.isfinite(v))
        m = part[bad]
        kept = f"its last checkpoint {m.path} is kept" if m.path.exists() else "no checkpoint was written"
        raise UserError(f"{self.name} {m.k + 1} diverged at step {step + 1} (loss is {losses[bad].item()}); "
                        f"{kept}. Lower --set lr=... (or the loss weights) and rerun with --overwrite or "
                        "another --out")

    def _train_proxy(self, m: "_Member", x: torch.Tensor, logits: torch.Tensor) -> None:
        """The proxy student learns the teacher on the generator's new images (KD)."""
        m.proxy.train()
        with self.compute.autocast():
            student = m.proxy(self.compute.batch(self.spec.normalize(x))).float()
        kd = F.kl_div(F.log_softmax(student, 1), F.log_softmax(logits, 1), reduction="batchmean", log_target=True)
        m.proxy_opt.zero_grad(set_to_none=True)
        kd.backward()
        m.proxy_opt.step()

    def _restore(self, path: Path, gen, opt=None, proxy=None, proxy_opt=None) -> int:
        """Load a training checkpoint (tensors only, weights_only=True) into the given objects; its step."""
        fix = "delete it to retrain that generator, or rerun with --overwrite"
        state = load_torch_safely(path, fix)
        if not isinstance(state, dict) or not self._same_config(state.get("config")):
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

    def _same_config(self, recorded: Any) -> bool:
        """Whether a checkpoint's recorded options are this config's (an option declared since it was written
        counts as its declared default)."""
        cls = type(self.config)
        return isinstance(recorded, dict) and not differences(
            recorded, hashed(self.config), cls, declared_defaults(cls))

    def _save(self, m: "_Member", step: int) -> None:
        state = {"config": hashed(self.config), "step": step, "generator": m.gen.state_dict(),
                 "optimizer": m.opt.state_dict()}
        if m.proxy is not None:
            state["proxy"] = m.proxy.state_dict()
            state["proxy_optimizer"] = m.proxy_opt.state_dict()
        save_torch_atomic(m.path, state)

    @torch.no_grad()
    def synthesize(self, labels: torch.Tensor, streams: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        compute = self.compute
        z = torch.randn(labels.shape[0], self.config.latent_dim, generator=generator) * self.config.sample_noise_scale
        z, labels = compute.batch(z), labels.to(compute.device)
        out = torch.empty(labels.shape[0], self.spec.channels, self.spec.size, self.spec.size, device=compute.device)
        for k in streams.unique().tolist():
            idx = (streams == k).nonzero().squeeze(1).to(compute.device)
            gen = self._sampler(k)
            with compute.autocast():
                views = self._render(k, gen, z[idx], labels[idx], generator)
            out[idx] = self._stored_view(*(v.float() for v in views))
        return out

    def _sampler(self, k: int) -> nn.Module:
        """Generator k as it samples (compiled once with --compile)."""
        if self.compute.compile and k not in self._compiled:
            self._compiled[k] = compile_module(self.generators[k], True)
        return self._compiled.get(k, self.generators[k])

    def _stored_view(self, native: torch.Tensor, teacher_view: torch.Tensor) -> torch.Tensor:
        """The image written to the shards, from the two outputs of `_render` (here: the teacher's view)."""
        return teacher_view
