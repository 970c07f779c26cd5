"""Datasets by name (CIFAR-10/100, SVHN, STL-10, ImageNet's layout) from tiny stand-in files in torchvision's
layouts, the offline errors, and the uint8 fast path (no resize at the model's size, decode-once cache)."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import dfkd.distill.datasets as data
from dfkd.common.errors import UserError
from dfkd.common.models import create_model
from dfkd.distill.data import real_batches
from dfkd.distill.teacher import TeacherConfig, train_teacher

RNG = np.random.default_rng(0)


def _offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("no network in tests")

    monkeypatch.setattr(data, "_download", no_network)


def write_cifar(root, classes=10, n=20):
    """CIFAR's python batches (pickled dicts of uint8 rows), as torchvision reads them."""
    if classes == 10:
        folder, train, test, meta, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], \
            ["test_batch"], "batches.meta", "labels"
        meta_content = {"label_names": [f"c{i}" for i in range(10)]}
    else:
        folder, train, test, meta, key = root / "cifar-100-python", ["train"], ["test"], "meta", "fine_labels"
        meta_content = {"fine_label_names": [f"c{i}" for i in range(100)]}
    folder.mkdir(parents=True)
    for name in train + test:
        batch = {"data": RNG.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 key: [int(v) for v in np.arange(n) % classes]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / meta).write_bytes(pickle.dumps(meta_content))


def write_svhn(root, n=20):
    from scipy.io import savemat

    (root / "svhn").mkdir(parents=True)
    for split in ("train", "test"):
        y = (np.arange(n) % 10 + 1).reshape(n, 1)  # SVHN labels 1..10, 10 is the digit 0
        savemat(root / "svhn" / f"{split}_32x32.mat", {"X": RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                        "y": y.astype(np.uint8)})


def write_stl10(root, n=10):
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        RNG.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")


def write_folder(folder, classes=2, per_class=6, size=28, mode="L"):
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(RNG.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"class{c}" / f"{i}.png")


def test_cifar10_and_100_from_torchvision_batches(tmp_path, monkeypatch):
    _offline(monkeypatch)
    write_cifar(tmp_path, 10)
    write_cifar(tmp_path, 100)
    spec = create_model("cifar_resnet8").input_spec
    train = data.real_dataset("cifar10", spec, train=True, root=tmp_path)
    test = data.real_dataset("cifar10", spec, train=False, root=tmp_path)
    assert isinstance(train, data.ImageArrays) and len(train) == 100 and len(test) == 20
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())["data"][0]
    assert torch.equal(test.images[0], torch.from_numpy(raw.reshape(3, 32, 32)))  # 32 px: not resized
    x, y = next(real_batches(test, 8))
    assert x.shape == (8, 3, 32, 32) and y.tolist() == list(range(8))
    spec100 = create_model("cifar_resnet8", num_classes=100).input_spec
    assert len(data.real_dataset("cifar100", spec100, train=True, root=tmp_path)) == 20
    with pytest.raises(UserError, match="cifar10 has 10 classes"):
        data.real_dataset("cifar10", spec100, root=tmp_path)


def test_named_dataset_offline_names_the_files(tmp_path, monkeypatch):
    _offline(monkeypatch)
    spec = create_model("cifar_resnet8").input_spec
    with pytest.raises(UserError, match=r"Put data_batch_1, .* into .*cifar-10-batches-py"):
        data.real_dataset("cifar10", spec, train=True, root=tmp_path)
    with pytest.raises(UserError, match=r"test_X.bin, test_y.bin into .*stl10_binary"):
        data.real_dataset("stl10", spec, train=False, root=tmp_path)
    with pytest.raises(UserError, match=r"imagenet/train/<wnid>"):
        data.real_dataset("imagenet", spec, train=True, root=tmp_path)
    (tmp_path / "cifar-10-batches-py").mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta"]:
        (tmp_path / "cifar-10-batches-py" / name).write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read cifar10"):
        data.real_dataset("cifar10", spec, train=True, root=tmp_path)


def test_svhn_and_stl10(tmp_path, monkeypatch):
    pytest.importorskip("scipy")
    _offline(monkeypatch)
    write_svhn(tmp_path)
    write_stl10(tmp_path)
    spec = create_model("cifar_resnet8").input_spec
    svhn = data.real_dataset("svhn", spec, train=True, root=tmp_path)
    assert len(svhn) == 20 and svhn.labels.tolist()[:10] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    stl = data.real_dataset("stl10", spec, train=False, root=tmp_path)
    assert stl.images.shape == (10, 3, 32, 32)  # 96 px resized once to the model's 32
    assert not data.is_natural("svhn", spec) and data.is_natural("stl10", spec)


def test_imagenet_layout_and_imagefolder(tmp_path):
    for split in ("train", "val"):
        write_folder(tmp_path / "imagenet" / split, classes=3, per_class=2, size=80, mode="RGB")
    spec = create_model("resnet18", num_classes=3, input_size=72).input_spec
    train = data.real_dataset("imagenet", spec, train=True, root=tmp_path, augment="crop-flip")
    val = data.real_dataset(str(tmp_path / "imagenet"), spec, train=False, root=tmp_path)
    assert len(train) == 6 and len(val) == 6 and not isinstance(train, data.ImageArrays)  # > 64 px: streamed
    assert train[0][0].shape == (3, 72, 72) and val[0][0].shape == (3, 72, 72)
    assert data.num_classes_of("imagenet", tmp_path) == 3


def test_imagefolder_at_the_model_size_is_not_resized_and_is_cached(tmp_path):
    write_folder(tmp_path / "images", classes=2, per_class=3, size=28)
    spec = create_model("lenet5", num_classes=2).input_spec
    ds = data.real_dataset(str(tmp_path / "images"), spec, train=False, root=tmp_path / "root")
    assert isinstance(ds, data.ImageArrays)
    pixels = np.asarray(Image.open(tmp_path / "images" / "class0" / "0.png"))
    assert np.array_equal(np.asarray(ds.images[0, 0]), pixels)  # exactly the file's pixels
    caches = list((tmp_path / "root" / "cache").glob("imagefolder-*.npy"))
    assert len(caches) == 1
    again = data.real_dataset(str(tmp_path / "images"), spec, train=False, root=tmp_path / "root")
    assert isinstance(again.images, np.memmap) and np.array_equal(np.asarray(again.images), np.asarray(ds.images))
    x, _ = ds[0]
    assert torch.allclose(x, spec.normalize(torch.from_numpy(np.array(pixels)).float().div(255)[None, None])[0])


def test_teacher_trains_on_cifar10_stand_in(tmp_path, monkeypatch):
    _offline(monkeypatch)
    write_cifar(tmp_path, 10, n=16)
    cfg = TeacherConfig(model="cifar_resnet8", out=str(tmp_path / "t.pt"), data="cifar10", data_root=str(tmp_path),
                        epochs=1, batch_size=16, workers=0, progress=False)
    metrics = train_teacher(cfg)
    assert metrics["epochs"] == 1 and 0 <= metrics["test_top1"] <= 100  # evaluated on CIFAR's test_batch
    from dfkd.common.models import load_model_checkpoint

    assert load_model_checkpoint(tmp_path / "t.pt")["input_spec"]["size"] == 32
    with pytest.raises(UserError, match="Put data_batch_1"):
        train_teacher(TeacherConfig(model="cifar_resnet8", out=str(tmp_path / "u.pt"), data="cifar10",
                                    data_root=str(tmp_path / "empty"), progress=False))
    from click.testing import CliRunner

    from dfkd.distill.cli import main

    result = CliRunner().invoke(main, ["teacher", "--model", "cifar_resnet8", "--data", "cifar10", "--data-root",
                                       str(tmp_path / "empty"), "--out", str(tmp_path / "v.pt")])
    assert result.exit_code == 2 and "Error: cifar10 is not under" in result.output
    assert "cifar-10-python.tar.gz" in result.output
    result = CliRunner().invoke(main, ["teacher", "--model", "cifar_resnet8", "--data", "cifar10", "--data-root",
                                       str(tmp_path), "--out", str(tmp_path / "w.pt"), "--epochs", "1",
                                       "--batch-size", "16", "--workers", "0", "--threads", "1", "--quiet"])
    assert result.exit_code == 0 and result.output.startswith("done: test_top1"), result.output


def test_crop_flip_augments_uint8_batches():
    from dfkd.distill.augment import train_augmentation

    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 3, 32, 32)
    torch.manual_seed(0)
    out = train_augmentation("crop-flip", 32)(x.clone())
    assert out.shape == x.shape and out.dtype == torch.uint8 and not torch.equal(out, x)
    assert train_augmentation("none", 32) is None
