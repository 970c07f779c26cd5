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
from .input_spec import INPUT_SPEC_FIELDS, InputSpec
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


def _cifar_torchvision_resnet(name: str, num_classes: int, in_chans: int) -> nn.Module:
    """torchvision ResNet-18/34 with the CIFAR stem (3x3 conv, stride 1, no max-pool), as in DFKD papers."""
    import torchvision

    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


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
    **{f"cifar_{n}": _SmallModel((lambda n: lambda nc, ch: _cifar_torchvision_resnet(n, nc, ch))(n), 3, 32,
                                 CIFAR_MEAN, CIFAR_STD)
       for n in ("resnet18", "resnet34")},
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
    checkpoint = None
    if weights != "none" and _looks_like_path(weights):
        checkpoint = load_model_checkpoint(weights)
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
        mean, std = _stats_for_channels(entry.mean, entry.std, ch)
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
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise UserError(f"weights in {weights} do not fit a '{name}' with {spec.num_classes} classes "
                            f"and {spec.channels} input channels ({first})") from None
    model.input_spec = spec
    model.arch = name
    return model


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
                         weights_sha256=state_dict_sha256(model), input_spec=model.input_spec.to_dict())
