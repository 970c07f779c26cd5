"""Supervised training of a registry model on real data: the teacher that synthesis later inverts.

    train_teacher(TeacherConfig(model="lenet5", out="runs/teacher/lenet5.pt"))   # MNIST, 8 epochs

SGD (Nesterov) with linear warmup + cosine decay per step, test accuracy after every epoch. Train-time
augmentation (`aug`): auto is crop-flip for natural images (reflect-pad crop by size/8 px + flip at
small sizes, random-resized crop + flip for streamed large images), crop (the same crop, no flip) for
MNIST-M's digits on photographs, and translate (+-`translate` px) for digits (MNIST, SVHN, 1-channel
folders). MNIST stays in memory as tensors; the named datasets and
small ImageFolder images as uint8 arrays (decoded once); large images stream through a DataLoader.
The result is a `save_model_checkpoint` file for `synth generate --weights`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dfkd.common.accel import grad_scaler, resolve_device
from dfkd.common.errors import UserError
from dfkd.common.models import create_model, save_model_checkpoint
from dfkd.common.options import option, positive, validate

from .augment import AUGMENTATIONS, augmentation, train_augmentation
from .data import real_batches
from .datasets import MNISTM_SIZES, NAMED_DATASETS, ImageArrays, is_natural, real_dataset
from .datasets import num_classes_of as dataset_classes
from .engine import build_optimizer, warmup_cosine
from .evaluation import evaluate_top1
from .loop import optimizer_step

MNIST_CLASSES = 10
TEACHER_AUGMENTATIONS = ("auto", *AUGMENTATIONS)


@dataclass
class TeacherConfig:
    """A teacher training run on `data`: mnist, cifar10, cifar100, svhn, stl10, imagenet (under `data_root`),
    a folder with train/ and val/ trees, or an ImageFolder path."""

    # the subjects of `distill teacher --help`, in its order; every command-line option names one (group=)
    HELP_GROUPS = ("Model and data", "Optimisation", "Augmentation", "Execution")

    model: str = option(help="Model name (e.g. lenet5, cifar_resnet20, resnet18, timm/resnet18, "
                        "my_pkg.nets:build).", group="Model and data")
    out: str = option(group="Model and data", effect="none",
                      help="Checkpoint file to write (e.g. runs/teacher/lenet5.pt).")
    data: str = option("mnist", group="Model and data",
                       help="Training set: mnist, mnistm / mnistm64 (32 / 64 px, built offline from MNIST and "
                       "photographs), cifar10, cifar100, svhn, stl10 (under --data-root, downloaded when missing), "
                       "imagenet (--data-root/imagenet/train), a folder with train/ and val/ trees, or an ImageFolder path.")
    data_root: str = option("data", effect="none", help="Where the datasets by name live (or are downloaded to); "
                            "decoded image caches go to its cache/.", group="Model and data")
    eval_data: str | None = option(None, effect="none", help="Test set, named as --data; none: the test split of a "
                                   "dataset by name, val/ of a train/val folder, no evaluation for a plain "
                                   "ImageFolder.", group="Model and data")
    epochs: int = option(8, group="Optimisation", help="Training epochs.", min=1)
    batch_size: int = option(128, group="Optimisation", help="Images per step.", min=1)
    lr: float = option(0.1, group="Optimisation", help="Peak SGD learning rate.", check=positive)
    wd: float = option(5e-4, group="Optimisation", help="Weight decay.", min=0)
    warmup_epochs: float = option(1.0, group="Optimisation",
                                  help="Linear warm-up of the learning rate, in epochs.", min=0)
    translate: int = option(2, group="Augmentation", min=0,
                            help="Random shift of up to this many px (--aug translate); 0 = off.")
    aug: str = option("auto", group="Augmentation", choices=TEACHER_AUGMENTATIONS,
                      help="Train-time augmentation. auto: crop-flip for natural images (pad-crop by size/8 + flip; "
                      "random-resized crop + flip above 64 px), crop without flip for mnistm(64), translate for digits "
                      "(mnist, svhn, 1-channel folders).")
    resolution: int | None = option(None, min=1, help="Model input size; none: the model's own (required for a "
                                    "module:callable model without an input_spec).", group="Model and data")
    workers: int = option(2, group="Execution", min=0, effect="order",
                          help="DataLoader workers for ImageFolder data (MNIST is held in memory).")
    seed: int = option(0, group="Execution", help="Random seed.", effect="order")
    device: str = option("auto", group="Execution", help="auto, cpu, cuda or cuda:N.", effect="none")
    progress: bool = option(True, help="Show a progress bar.", effect="none", cli=False)


def num_classes_of(data: str, root: str = "data") -> int:
    """Class count of a dataset by name, a train/val folder or an ImageFolder tree (its sub-folders)."""
    return dataset_classes(data, root)


def default_eval_data(data: str) -> str | None:
    """The held-out split that goes with `data`: the same name (its test split) or train/val folder."""
    path = Path(data)
    if data.lower() in ("mnist", *MNISTM_SIZES, "imagenet", *NAMED_DATASETS) or ((path / "train").is_dir() and (path / "val").is_dir()):
        return data
    return None


def auto_augmentation(data: str, spec) -> str:
    """--aug auto: crop (no flip) for MNIST-M, crop-flip for other natural images, translate for digits."""
    if data.lower() in MNISTM_SIZES:
        return "crop"
    return "crop-flip" if is_natural(data, spec) else "translate"


def train_teacher(config: TeacherConfig) -> dict:
    """Train and save the teacher. Returns test_top1 (None without test data), epochs, seconds,
    images_per_s, out."""
    validate(config)  # the declared ranges and choices (the CLI no longer checks them itself)
    out = Path(config.out)
    if out.exists():
        raise UserError(f"{out} exists: delete it or choose another --out (shards made with a teacher are bound "
                        "to its exact weights)")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = create_model(config.model, num_classes=num_classes_of(config.data, config.data_root),
                         input_size=config.resolution)
    spec = model.input_spec
    aug = config.aug if config.aug != "auto" else auto_augmentation(config.data, spec)
    # an ImageFolder's images are all decoded once here (cache or check): a damaged one stops the run now
    train_set = real_dataset(config.data, spec, train=True, root=config.data_root, augment=aug,
                             workers=config.workers)
    if isinstance(train_set, ImageArrays):  # augmented as uint8 batches
        train_set.augment = train_augmentation(aug, spec.size, config.translate)
    eval_name = config.eval_data or default_eval_data(config.data)
    test_set = (real_dataset(eval_name, spec, train=False, root=config.data_root, workers=config.workers)
                if eval_name else None)
    steps_per_epoch = len(train_set) // config.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{config.data} has {len(train_set)} images, less than one batch: lower --batch-size")

    model.to(device)
    optimizer = build_optimizer(model, "sgd", config.lr, config.wd)
    scheduler = warmup_cosine(optimizer, config.epochs * steps_per_epoch, round(config.warmup_epochs * steps_per_epoch))
    black = spec.normalize(torch.zeros(1, spec.channels, 1, 1))  # padding colour in the normalised space
    # ImageArrays are augmented as uint8 before normalisation, a streamed dataset's crops by its transform
    augment = (None if isinstance(train_set, ImageArrays) or (aug != "translate" and hasattr(train_set, "transform"))
               else augmentation(aug, spec.size, config.translate, black))
    generator = torch.Generator().manual_seed(config.seed)
    scaler = grad_scaler("none", device)  # disabled: the plain backward and step
    log = tqdm.write if config.progress else (lambda message: None)
    top1, seconds = None, 0.0
    for epoch in range(config.epochs):
        model.train()
        start, total_loss = time.perf_counter(), 0.0
        batches = real_batches(train_set, config.batch_size, shuffle=True, workers=config.workers, generator=generator)
        with tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                  disable=not config.progress, leave=False) as bar:
            for inputs, labels in bar:
                if augment is not None:
                    inputs = augment(inputs)
                loss = F.cross_entropy(model(inputs.to(device, non_blocking=True)), labels.to(device))
                optimizer_step(loss, optimizer, scheduler, scaler)
                total_loss += loss.item()
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        seconds += time.perf_counter() - start
        top1 = evaluate_top1(model, test_set, device, config.workers) if test_set is not None else None
        log(f"epoch {epoch + 1}/{config.epochs}: loss {total_loss / steps_per_epoch:.4f}"
            + (f", test top-1 {top1:.2f}%" if top1 is not None else ""))

    save_model_checkpoint(out, model, extra={"data": config.data, "epochs": config.epochs, "test_top1": top1,
                                             "aug": aug})
    return {"test_top1": top1, "epochs": config.epochs, "seconds": seconds,
            "images_per_s": config.epochs * steps_per_epoch * config.batch_size / seconds, "out": str(out)}
