"""Model registry: every torchvision classifier by name, plus small models for 28-32 px data.

Each model built here carries an `InputSpec` (channels, size, mean, std, classes) as
`model.input_spec`, so the stages know how to feed it without any real data at hand.

Weights (`--weights`):
  none                  random initialisation
  DEFAULT / <ENUM NAME> torchvision's pretrained weights (downloads; clear error offline)
  <path>                a checkpoint saved by `save_model_checkpoint` or a plain state_dict

Besides the registry's names, `name` may be
  timm/<model>          a timm model (optional extra `dfkd[timm]`), e.g. timm/resnet50.a1_in1k; weights
                        DEFAULT load its pretrained weights through timm (Hugging Face hub cache)
  package.module:fn     the user's own architecture: `fn(**kwargs)` builds the model (it gets the
                        num_classes / in_chans it accepts); weights come from a checkpoint path
The input spec comes from the model's own metadata where it has one (timm's pretrained_cfg, or an
`input_spec` attribute on a user model), otherwise from num_classes / in_chans / input_size.

The DFKD papers' CIFAR architectures (`PAPER_CIFAR`: cifar_resnet18/34, wrn_16_1/16_2/40_1/40_2,
cifar_vgg8/11) use the parameter names of the CIFAR teacher bundle that Fast-Datafree released and CMI,
NAYER and others reuse, so its files (`<dataset>_<arch>.pth`, weights under `state_dict`) load as they are;
such a file records no input spec: the classes come from its last linear layer, the mean/std from its name
(`cifar10_` / `cifar100_`, else the class count), and the teacher record names the source. Checkpoints of
cifar_resnet18/34 from before (torchvision's `downsample.*` / `fc.*`) are read through `LEGACY_KEYS`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UserError
from .fileio import load_torch_safely, save_torch_atomic
from .input_spec import CIFAR_BUNDLE_STATS, INPUT_SPEC_FIELDS, InputSpec
from .remote import http_reason
from .shards import TeacherRecord

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------- small models
class LeNet5(nn.Module):
    """LeNet-5 with BatchNorm after every conv (the DFKD MNIST teacher/student pair).

    conv5x5(pad 2) -> BN -> ReLU -> maxpool, conv5x5 -> BN -> ReLU -> maxpool,
    conv5x5 -> BN -> ReLU -> global average pool -> FC -> ReLU -> FC.
    At 28 px this is the classic 32 px LeNet-5 layout (28 -> 14 -> 10 -> 5 -> 1); the global
    pool and the linear head make it a GAP + linear classifier (usable for CAMs).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, widths=(6, 16, 120, 84)):
        super().__init__()
        c1, c2, c3, f1 = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, 5, padding=2, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 5, bias=False), nn.BatchNorm2d(c3), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(c3, f1), nn.ReLU(inplace=True), nn.Linear(f1, num_classes))

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class _CifarBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet-(6n+2): 3x3 stem, three stages of 16/32/64 x width channels."""

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, width: int = 1):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                layers.append(_CifarBasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def features(self, x):
        return self.layers(torch.relu(self.bn1(self.conv1(x))))

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class _BasicBlock(_CifarBasicBlock):
    """The papers' CIFAR ResNet block (same parameter names), its ReLUs as modules (the CAM probe sees them)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, stride)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PaperCifarResNet(nn.Module):
    """ResNet-18/34 as the DFKD papers' CIFAR code has it: 3x3 stem at 64 channels, stride 1, no max-pool, four
    stages of BasicBlocks (64/128/256/512, strides 1/2/2/2, a 1x1 conv + BN `shortcut` where the shape changes),
    global average pool, `linear`. Parameter names: conv1, bn1, layer1..4.N.{conv1,bn1,conv2,bn2,shortcut.0/1}, linear."""

    def __init__(self, blocks: tuple, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            layer = []
            for j in range(n):
                layer.append(_BasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(torch.flatten(self.pool(x), 1))


class _WideBlock(nn.Module):
    """Zagoruyko's pre-activation block: bn1-relu1-conv1-bn2-relu2-conv2; where the width changes a 1x1 conv
    (`convShortcut`, no bias) takes the pre-activated input, else the input is added as it is. Dropout 0."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(a))))
        return out + (x if self.equal else self.convShortcut(a))


class _WideStage(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[_WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-d-k (Zagoruyko & Komodakis 2016) as the DFKD papers' CIFAR code has it: conv1 3x3 to 16, block1..3 of
    (d-4)/6 pre-activation blocks at 16k/32k/64k channels (strides 1/2/2), bn1 + ReLU, global average pool, `fc`.
    Parameter names: conv1, block{1,2,3}.layer.N.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc."""

    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WRN depth must be 6n+4")
        n, widths = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.block1 = _WideStage(n, widths[0], widths[1], 1)
        self.block2 = _WideStage(n, widths[1], widths[2], 2)
        self.block3 = _WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(self.relu(self.bn1(x))), 1))


VGG_CFGS = {"cifar_vgg8": ((64,), (128,), (256,), (512,), (512,)),                        # 'S'
            "cifar_vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512))}         # 'A'


class CifarVGG(nn.Module):
    """The CIFAR VGG of CRD / Fast-Datafree (vgg8_bn, vgg11_bn): block0..4, each conv3x3 (with bias) + BN, with a
    ReLU between the convs of a block and after the block; max-pools pool0..2 after blocks 0-2 (pool3 after block 3
    only for inputs of 64 px or more, as theirs does at 64), global average pool, `classifier` Linear(512, classes).
    Parameter names: block{i}.{0,1} for a block's first conv + BN, .{3,4} for its second (a ReLU at index 2)."""

    def __init__(self, cfg: tuple, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        cin = in_chans
        for i, widths in enumerate(cfg):
            layers = []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
                cin = w
            setattr(self, f"block{i}", nn.Sequential(*layers[:-1]))
        for i in range(4):
            setattr(self, f"pool{i}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.relu = nn.ReLU()
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        big = x.shape[2] >= 64
        x = self.pool0(self.relu(self.block0(x)))
        x = self.pool1(self.relu(self.block1(x)))
        x = self.pool2(self.relu(self.block2(x)))
        x = self.relu(self.block3(x))
        if big:
            x = self.pool3(x)
        x = self.relu(self.block4(x))
        return self.classifier(torch.flatten(self.pool4(x), 1))


def _paper_cifar_model(name: str, num_classes: int, in_chans: int) -> nn.Module:
    if name.startswith("cifar_resnet"):
        return PaperCifarResNet({"cifar_resnet18": (2, 2, 2, 2), "cifar_resnet34": (3, 4, 6, 3)}[name], num_classes,
                                in_chans)
    if name.startswith("wrn_"):
        _, depth, widen = name.split("_")
        return WideResNet(int(depth), int(widen), num_classes, in_chans)
    return CifarVGG(VGG_CFGS[name], num_classes, in_chans)


# our name -> the names the bundle's code (and its files' `arch` field) uses for the same architecture
PAPER_CIFAR = {"cifar_resnet18": ("resnet18",), "cifar_resnet34": ("resnet34",),
               "wrn_16_1": ("wrn16_1",), "wrn_16_2": ("wrn16_2",), "wrn_40_1": ("wrn40_1",), "wrn_40_2": ("wrn40_2",),
               "cifar_vgg8": ("vgg8", "vgg8_bn"), "cifar_vgg11": ("vgg11", "vgg11_bn")}
# checkpoints of cifar_resnet18/34 saved when they were torchvision ResNets: their names -> the papers'
LEGACY_KEYS = (("downsample.", "shortcut."), ("fc.", "linear."))


@dataclass(frozen=True)
class _SmallModel:
    build: callable
    channels: int
    size: int
    mean: tuple = field(default=MNIST_MEAN)
    std: tuple = field(default=MNIST_STD)
    num_classes: int = 10


SMALL_MODELS: dict[str, _SmallModel] = {
    "lenet5": _SmallModel(lambda nc, ch: LeNet5(nc, ch), 1, 28),
    "lenet5_half": _SmallModel(lambda nc, ch: LeNet5(nc, ch, widths=(3, 8, 60, 42)), 1, 28),
    **{f"cifar_resnet{d}": _SmallModel((lambda d: lambda nc, ch: CifarResNet(d, nc, ch))(d), 3, 32,
                                        CIFAR_MEAN, CIFAR_STD)
       for d in (8, 14, 20, 32, 44, 56)},
    **{n: _SmallModel((lambda n: lambda nc, ch: _paper_cifar_model(n, nc, ch))(n), 3, 32,
                      *CIFAR_BUNDLE_STATS[10])
       for n in PAPER_CIFAR},
}


def torchvision_model_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    return sorted(SMALL_MODELS) + torchvision_model_names()


TIMM_PREFIX = "timm/"


def is_timm_name(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def is_module_name(name: str) -> bool:
    """`package.module:callable` (a user's own architecture)."""
    module, sep, attr = name.partition(":")
    return bool(sep) and bool(module) and attr.isidentifier() and all(
        part.isidentifier() for part in module.split("."))


# --------------------------------------------------------------------------- building
def create_model(name: str, num_classes: int | None = None, weights: str | None = "none",
                 in_chans: int | None = None, input_size: int | None = None) -> nn.Module:
    """Build registry model `name` and load `weights`; the result carries `.input_spec`.

    num_classes/in_chans/input_size override the model's defaults (a checkpoint's recorded
    spec wins for the values it stores, and a conflicting explicit value is an error).
    """
    weights = "none" if weights in (None, "", "none", "None") else weights
    checkpoint, source, stats_classes = None, None, None
    if weights != "none" and _looks_like_path(weights):
        checkpoint = load_model_checkpoint(weights)
        if name in PAPER_CIFAR and checkpoint.get("input_spec") is None:
            checkpoint, source, stats_classes = _bundle_checkpoint(name, checkpoint, weights, num_classes)
            num_classes = checkpoint["num_classes"]
        if checkpoint.get("arch") not in (None, name):
            raise UserError(f"checkpoint {weights} holds a '{checkpoint['arch']}', not a '{name}': "
                            f"use the model '{checkpoint['arch']}' with it, or another checkpoint")
        recorded = checkpoint.get("input_spec")
        if recorded is not None:
            recorded = checkpoint_input_spec(recorded, weights)
            if num_classes is not None and num_classes != recorded.num_classes:
                raise UserError(f"checkpoint {weights} has {recorded.num_classes} classes, not {num_classes}")
            num_classes = recorded.num_classes
            in_chans = in_chans or recorded.channels
            input_size = input_size or recorded.size

    if name in SMALL_MODELS:
        entry = SMALL_MODELS[name]
        nc = num_classes or entry.num_classes
        ch = in_chans or entry.channels
        mean, std = entry.mean, entry.std
        if name in PAPER_CIFAR:   # the bundle's CIFAR-100 normalisation for 100 classes (or a cifar100_ file)
            mean, std = CIFAR_BUNDLE_STATS[100 if (stats_classes or nc) == 100 else 10]
        mean, std = _stats_for_channels(mean, std, ch)
        model = entry.build(nc, ch)
        spec = InputSpec(ch, input_size or entry.size, mean, std, nc)
        if weights != "none" and checkpoint is None:
            raise UserError(f"'{name}' has no pretrained weights to download; use weights 'none' or a checkpoint path")
    elif is_timm_name(name):
        model, spec = _create_timm(name, num_classes, weights if checkpoint is None else "none", in_chans, input_size)
    elif is_module_name(name):
        if weights != "none" and checkpoint is None:
            raise UserError(f"'{name}' is your own architecture: it has no weights to download; pass weights "
                            "'none' or a checkpoint path (--weights PATH)")
        model, spec = _create_from_module(name, num_classes, in_chans, input_size,
                                          checkpoint.get("input_spec") if checkpoint else None)
    elif name in torchvision_model_names():
        model, spec = _create_torchvision(name, num_classes, weights if checkpoint is None else "none",
                                          in_chans, input_size)
    else:
        raise ModelNameError(f"unknown model '{name}'. Known small models: {', '.join(sorted(SMALL_MODELS))}; "
                             "any torchvision classification model (e.g. resnet18, resnet50, mobilenet_v2); "
                             "timm/<name> for a timm model; or package.module:function for your own")

    if checkpoint is not None:
        state = checkpoint["state_dict"]
        if name in ("cifar_resnet18", "cifar_resnet34"):
            state = _legacy_resnet_keys(state)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise UserError(f"weights in {weights} do not fit a '{name}' with {spec.num_classes} classes "
                            f"and {spec.channels} input channels ({first})") from None
    model.input_spec = spec
    model.arch = name
    if source is not None:
        model.weights_source = source
    return model


def _bundle_checkpoint(name: str, checkpoint: dict, weights: str, num_classes: int | None):
    """A checkpoint of a PAPER_CIFAR model with no recorded input spec (the shared CIFAR teacher bundle's files,
    `<dataset>_<arch>.pth` with the weights under `state_dict`, or a bare state_dict): its `module.` prefix dropped,
    its `arch` (the bundle's name) checked against `name`, its class count read off the last linear layer.
    Returns (checkpoint with our arch and num_classes, the source line for the teacher record, the class count whose
    normalisation applies: the file name's cifar10_ / cifar100_ prefix, else None)."""
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in checkpoint["state_dict"].items()}
    theirs = checkpoint.get("arch")
    if theirs is not None and theirs != name and theirs not in PAPER_CIFAR[name]:
        ours = next((k for k, v in PAPER_CIFAR.items() if theirs in v), None)
        raise UserError(f"checkpoint {weights} holds a '{theirs}'" + (f" (here: {ours})" if ours else "")
                        + f", not a '{name}': use " + (f"--teacher {ours}" if ours else "the model it was made for")
                        + " with it, or another checkpoint")
    heads = [k for k in ("linear.weight", "fc.weight", "classifier.weight") if k in state]
    if not heads or getattr(state[heads[0]], "dim", lambda: 0)() != 2:
        raise CheckpointError(f"checkpoint {weights} has no linear.weight, fc.weight or classifier.weight to read the "
                              f"class count of a '{name}' from; give a checkpoint of that architecture")
    found = int(state[heads[0]].shape[0])
    if num_classes is not None and num_classes != found:
        raise UserError(f"checkpoint {weights} has {found} classes ({heads[0]} {tuple(state[heads[0]].shape)}), "
                        f"not {num_classes}; leave the class count out or give a checkpoint with {num_classes}")
    file = Path(weights).name
    prefix = next((n for n in (100, 10) if file.startswith(f"cifar{n}_")), None)
    stats = prefix or (100 if found == 100 else 10)
    why = f"the file name's cifar{prefix}_" if prefix else f"the class count ({found})"
    source = (f"{file}: a checkpoint without an input spec (the shared CIFAR teacher bundle's format: weights under "
              f"'state_dict'" + (f", arch '{theirs}'" if theirs else "") + f"); {found} classes from {heads[0]}, "
              f"CIFAR-{stats} mean/std from {why}")
    return {"arch": None, "state_dict": state, "num_classes": found}, source, prefix


def _legacy_resnet_keys(state: dict) -> dict:
    """cifar_resnet18/34 checkpoints saved when these were torchvision ResNets (`layerN.M.downsample.*`, `fc.*`):
    renamed to the papers' `shortcut.*` / `linear.*` (the same layers and shapes)."""
    if not any(k.startswith("fc.") or ".downsample." in k for k in state):
        return state
    out = {}
    for key, value in state.items():
        if key.startswith("fc."):
            key = "linear." + key[len("fc."):]
        out[key.replace(".downsample.", ".shortcut.")] = value
    return out


class CheckpointError(UserError):
    """A checkpoint file that cannot be used as it is (whatever model it is given to): missing, a folder,
    damaged, pickled, or of another layout."""


class ModelNameError(UserError):
    """A model name that builds no model here (unknown, its package not installed or not importable)."""


class WeightsUnavailableError(UserError):
    """Pretrained weights that cannot be fetched (offline, an HTTP error)."""


def checkpoint_input_spec(recorded, path) -> InputSpec:
    """The `input_spec` a checkpoint records, checked: every field present, of its type and range
    (CheckpointError naming the file and the fix otherwise)."""
    fix = ("save the model again with this project (`save_model_checkpoint`), or give its bare state_dict "
           "(a file of tensors only), which takes the model's own input spec")
    if not isinstance(recorded, dict):
        raise CheckpointError(f"checkpoint {path} has an input_spec of type {type(recorded).__name__}, not a "
                              f"dict of {', '.join(INPUT_SPEC_FIELDS)}; {fix}")
    missing = [k for k in INPUT_SPEC_FIELDS if k not in recorded]
    if missing:
        raise CheckpointError(f"checkpoint {path} has an input_spec without {', '.join(missing)} (it holds "
                              f"{', '.join(map(str, recorded)) or 'nothing'}); {fix}")
    try:
        spec = InputSpec(int(recorded["channels"]), int(recorded["size"]),
                         tuple(float(v) for v in recorded["mean"]), tuple(float(v) for v in recorded["std"]),
                         int(recorded["num_classes"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an input_spec with a value of the wrong type ({e}); "
                              f"{fix}") from None
    if (min(spec.channels, spec.size, spec.num_classes) < 1 or len(spec.mean) != spec.channels
            or len(spec.std) != spec.channels or min(spec.std, default=0) <= 0):
        raise CheckpointError(f"checkpoint {path} has an input_spec out of range ({recorded!r}: channels, size and "
                              "num_classes must be >= 1, mean and std one value per channel, std > 0); " + fix)
    return spec


def _stats_for_channels(mean, std, channels):
    if len(mean) == channels:
        return tuple(mean), tuple(std)
    if len(mean) == 1:
        return tuple(mean) * channels, tuple(std) * channels
    return (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pt", ".pth", ".ckpt", ".bin")) or Path(weights).exists()


def _create_torchvision(name, num_classes, weights, in_chans, input_size):
    import torchvision

    size, mean, std, nc = 224, IMAGENET_MEAN, IMAGENET_STD, 1000
    weights_enum = None
    if weights != "none":
        try:
            weights_enum = torchvision.models.get_model_weights(name)
            weights_enum = weights_enum.DEFAULT if weights.upper() == "DEFAULT" else weights_enum[weights.split(".")[-1]]
        except (KeyError, ValueError):
            options = ", ".join(w.name for w in torchvision.models.get_model_weights(name))
            raise UserError(f"unknown weights '{weights}' for {name}; use DEFAULT, one of {options}, "
                            "none, or a checkpoint path") from None
        nc = len(weights_enum.meta.get("categories") or []) or nc
        transforms = weights_enum.transforms()
        size = int(getattr(transforms, "crop_size", [size])[0])
        mean, std = tuple(transforms.mean), tuple(transforms.std)
        if num_classes not in (None, nc):
            raise UserError(f"{name} weights {weights_enum.name} have {nc} classes, not {num_classes}")
        if in_chans not in (None, 3):
            raise UserError(f"{name} pretrained weights take 3 input channels, not {in_chans}")
        try:
            model = torchvision.models.get_model(name, weights=weights_enum)
        except Exception as e:  # urllib/http/ssl errors when offline
            cache = Path(torch.hub.get_dir()) / "checkpoints"
            raise WeightsUnavailableError(
                f"could not download {name} weights {weights_enum.name} from {weights_enum.url} ({http_reason(e)}). "
                f"Offline? Put the file {Path(weights_enum.url).name} into {cache}, "
                "or give the path of a local checkpoint as the weights") from None
    else:
        nc = num_classes or nc
        model = torchvision.models.get_model(name, weights=None, num_classes=nc)
        if in_chans not in (None, 3):
            _replace_first_conv(model, in_chans)
        mean, std = _stats_for_channels(mean, std, in_chans or 3)
    spec = InputSpec(in_chans or 3, input_size or size, tuple(mean), tuple(std), nc)
    return model, spec


def _create_timm(name, num_classes, weights, in_chans, input_size):
    """A timm model; its pretrained_cfg gives the input size, mean, std and classes."""
    try:
        import timm
    except ImportError:
        raise ModelNameError(f"'{name}' needs timm: pip install 'dfkd[timm]' (or pip install timm)") from None
    arch = name[len(TIMM_PREFIX):]
    if not timm.is_model(arch):
        raise ModelNameError(f"timm has no model '{arch}'; list them with python -c \"import timm; "
                             f"print(timm.list_models('*{arch.split('.')[0][:6]}*'))\"")
    if weights not in ("none", "DEFAULT"):
        raise UserError(f"weights '{weights}' for {name}: use DEFAULT (timm's pretrained weights; pick the tag in the "
                        "name, e.g. timm/resnet50.a1_in1k), none, or a checkpoint path")
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    if weights == "DEFAULT":
        model = _timm_pretrained(timm, arch, kwargs)
    else:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    channels = in_chans or int((cfg.get("input_size") or (3,))[0])
    mean, std = _stats_for_channels(cfg.get("mean") or IMAGENET_MEAN, cfg.get("std") or IMAGENET_STD, channels)
    nc = int(getattr(model, "num_classes", None) or num_classes or cfg.get("num_classes") or 1000)
    return model, InputSpec(channels, input_size or size, mean, std, nc)


def _timm_pretrained(timm, arch: str, kwargs: dict) -> nn.Module:
    import io
    import logging

    quiet = logging.getLogger("huggingface_hub")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its retry messages; the error below says what happened
    offline = _hub_unreachable()
    try:
        with contextlib.redirect_stderr(io.StringIO()), _hub_offline(offline):
            return timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as e:  # LocalEntryNotFoundError, connection and SSL errors when offline
        try:
            from huggingface_hub.constants import HF_HUB_CACHE as cache
        except ImportError:
            cache = "~/.cache/huggingface/hub"
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise WeightsUnavailableError(
            f"could not get timm's pretrained weights for {arch} ({type(e).__name__}: {reason}). Offline? timm loads "
            f"them from the Hugging Face hub cache {cache} (copy a cache that holds them there, e.g. from "
            f"`timm.create_model('{arch}', pretrained=True)` on a machine online), or give the path of a local "
            "checkpoint as the weights") from None
    finally:
        quiet.setLevel(level)


def _hub_unreachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub cannot be reached directly (checked only without a proxy or a custom
    endpoint): then only its cache is read, instead of a minute of retries before the same error."""
    import socket

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT")):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return False
    except OSError:
        return True


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """huggingface_hub's offline mode (cache only) while the block runs, when `offline`."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _create_from_module(name, num_classes, in_chans, input_size, checkpoint_spec=None):
    """The user's `module:callable`; spec from the model's `input_spec` attribute (an InputSpec or a dict,
    any subset of its fields), a recorded checkpoint spec, or the given options."""
    module_name, _, attr = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # console scripts do not put the working directory on the path
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelNameError(f"cannot import '{module_name}' for the model '{name}' ({e}); run from the folder "
                             "that holds it or add that folder to PYTHONPATH") from None
    build = getattr(module, attr, None)
    if not callable(build):
        raise ModelNameError(f"'{module_name}' has no callable '{attr}' to build the model '{name}'")
    try:
        params = inspect.signature(build).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        params, takes_any = {}, False
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_chans", in_chans))
              if v is not None and (takes_any or k in params)}
    model = build(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelNameError(f"'{name}' returned a {type(model).__name__}, not a torch.nn.Module")
    hint = getattr(model, "input_spec", None)
    hint = hint.to_dict() if isinstance(hint, InputSpec) else dict(hint or {})
    for key, value in (checkpoint_spec or {}).items():
        hint.setdefault(key, value)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = in_chans or int(hint.get("channels") or (first_conv.in_channels if first_conv is not None else 3))
    size = input_size or hint.get("size")
    if size is None:
        raise UserError(f"'{name}' does not say its input size: pass --resolution N (or give the model an "
                        "input_spec attribute with a size)")
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    mean, std = _stats_for_channels(hint.get("mean", default_mean), hint.get("std", default_std), channels)
    nc = num_classes or hint.get("num_classes")
    if nc is None:
        with torch.no_grad():
            was_training = model.training
            nc = int(model.eval()(torch.zeros(1, channels, int(size), int(size))).shape[-1])
            model.train(was_training)
    if num_classes is not None and not ({"num_classes"} & set(params) or takes_any):
        nc = num_classes  # the callable ignores it; a wrong head shows when the model is first run
    return model, InputSpec(channels, int(size), tuple(mean), tuple(std), int(nc))


def _replace_first_conv(model: nn.Module, in_chans: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(in_chans, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.bias is not None)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return


# --------------------------------------------------------------------------- checkpoints
def save_model_checkpoint(path: str | os.PathLike, model: nn.Module, extra: dict | None = None) -> None:
    """Save a model with its architecture name and input spec (loadable with weights_only=True)."""
    payload = {"arch": model.arch, "input_spec": model.input_spec.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if extra:
        payload["extra"] = extra
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_torch_atomic(path, payload)


def load_model_checkpoint(path: str | os.PathLike) -> dict:
    """Load a model checkpoint safely. Returns {'arch', 'input_spec', 'state_dict'} (arch/spec may be None).
    CheckpointError for a file that cannot be used."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"weights {path} is a folder, not a checkpoint file; give the path of a checkpoint "
                              "file, DEFAULT or none")
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist; give an existing checkpoint, DEFAULT or none")
    try:
        obj = load_torch_safely(path, "give a checkpoint saved by this project, or a plain state_dict of tensors")
    except UserError as e:
        raise CheckpointError(e.message) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return {"arch": obj.get("arch"), "input_spec": obj.get("input_spec"), "state_dict": obj["state_dict"]}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"arch": None, "input_spec": None, "state_dict": obj}
    raise CheckpointError(f"checkpoint {path} holds neither a model checkpoint nor a state_dict")


def state_dict_sha256(model: nn.Module) -> str:
    """Checksum of a model's weights and buffers (name, dtype, shape, bytes), independent of file format."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()



def teacher_record(arch: str, weights: str, model: nn.Module) -> TeacherRecord:
    """The manifest's record of a teacher built by `create_model(arch, weights=weights)`."""
    path = Path(weights)
    return TeacherRecord(arch=arch, weights=str(weights), weights_path=str(path.resolve()) if path.is_file() else None,
                         weights_sha256=state_dict_sha256(model), input_spec=model.input_spec.to_dict(),
                         source=getattr(model, "weights_source", None))
