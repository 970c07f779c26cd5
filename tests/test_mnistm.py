"""MNIST-M built offline (distill/datasets.py): the |patch - digit| rule, disjoint photographs, determinism and the
cache, the errors, `distill teacher --data mnistm` with its crop-without-flip augmentation. Tiny stand-in MNIST
and photographs written by the test: no network, no scikit-image needed."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dfkd.distill.datasets as data
from dfkd.common.errors import UserError
from dfkd.common.models import create_model
from dfkd.distill.teacher import TeacherConfig, train_teacher

from test_datasets_mnist import _fake_mnist  # the tiny IDX files of the MNIST loader's tests

TRAIN_COLOUR, TEST_COLOUR = (200, 100, 50), (10, 240, 120)


def _stand_ins(root, n=20, photos="flat", extra=0):
    """A tiny MNIST (random digits) and photographs: one flat colour per split, or random noise (`extra` px
    larger on each side for 64 px patches)."""
    rng = np.random.default_rng(0)
    raw = _fake_mnist(root, n, rng)   # the photographs below draw on from the same generator
    for split, colour in (("train", TRAIN_COLOUR), ("test", TEST_COLOUR)):
        folder = root / "mnistm" / "photos" / split
        folder.mkdir(parents=True)
        for i in range(2):
            shape = (40 + 10 * i + extra, 60 + extra, 3)
            pixels = (np.broadcast_to(np.array(colour, np.uint8), shape) if photos == "flat"
                      else rng.integers(0, 256, shape))
            Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(folder / f"{split}{i}.png")
    return raw


def test_mnistm_blends_each_digit_into_its_own_splits_photographs(tmp_path):
    _stand_ins(tmp_path)
    spec = create_model("cifar_resnet8").input_spec
    train = data.real_dataset("mnistm", spec, train=True, root=tmp_path)
    test = data.real_dataset("mnistm", spec, train=False, root=tmp_path)
    assert isinstance(train, data.ImageArrays) and train.images.shape == (20, 3, 32, 32)
    assert train.images.dtype == np.uint8 and train.labels.tolist() == [i % 10 for i in range(20)]
    digits, _ = data.load_mnist(tmp_path, train=True)
    d = F.pad(digits, (2, 2, 2, 2)).numpy().astype(np.int16)   # 28 -> 32 px, zero-padded
    for images, colour in ((train.images, TRAIN_COLOUR), (test.images, TEST_COLOUR)):
        if colour == TEST_COLOUR:
            d = F.pad(data.load_mnist(tmp_path, train=False)[0], (2, 2, 2, 2)).numpy().astype(np.int16)
        expected = np.abs(np.array(colour, np.int16)[None, :, None, None] - d[:, None])   # |p - d| per channel
        assert np.array_equal(np.asarray(images), expected)   # and only this split's photographs
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and int(y) == 0
    assert data.num_classes_of("mnistm") == 10 and "mnistm" in data.dataset_names()
    assert not data.is_natural("mnistm", spec)


def test_mnistm64_draws_the_digits_at_64_px_into_64_px_patches(tmp_path):
    """`mnistm64`: the 32 px digits bilinearly upsampled to 64 px, then the same |p - d| rule on
    64 x 64 patches of the split's photographs; its own cache next to the 32 px one; a teacher trains on it."""
    _stand_ins(tmp_path, extra=40)
    spec = create_model("cifar_resnet8", input_size=64).input_spec
    train = data.real_dataset("mnistm64", spec, train=True, root=tmp_path)
    assert train.images.shape == (20, 3, 64, 64) and train.images.dtype == np.uint8
    digits = F.pad(data.load_mnist(tmp_path, train=True)[0], (2, 2, 2, 2))[:, None].float()
    d = F.interpolate(digits, size=(64, 64), mode="bilinear", align_corners=False).round()[:, 0].numpy()
    expected = np.abs(np.array(TRAIN_COLOUR, np.int16)[None, :, None, None] - d.astype(np.int16)[:, None])
    assert np.array_equal(np.asarray(train.images), expected)
    small = data.real_dataset("mnistm", create_model("cifar_resnet8").input_spec, train=True, root=tmp_path)
    assert small.images.shape == (20, 3, 32, 32)
    assert len(list((tmp_path / "cache").glob("mnistm64-train-*.npy"))) == 1
    assert len(list((tmp_path / "cache").glob("mnistm-train-*.npy"))) == 1
    assert data.num_classes_of("mnistm64") == 10 and "mnistm64" in data.dataset_names()
    assert not data.is_natural("mnistm64", spec)
    cfg = TeacherConfig(model="cifar_resnet8", out=str(tmp_path / "t.pt"), data="mnistm64", resolution=64,
                        data_root=str(tmp_path), epochs=1, batch_size=16, workers=0, progress=False)
    metrics = train_teacher(cfg)
    assert metrics["epochs"] == 1 and 0 <= metrics["test_top1"] <= 100
    saved = torch.load(tmp_path / "t.pt", weights_only=True)["extra"]
    assert saved["aug"] == "crop"
    _, _ = data.build_mnistm(tmp_path, train=False, size=64)
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / "mnistm" / "photos" / "test" / "small.png")
    with pytest.raises(UserError, match="smaller than MNIST-M's 64 x 64"):
        data.build_mnistm(tmp_path, train=False, size=64)


def test_mnistm_is_deterministic_cached_and_seeded(tmp_path):
    _stand_ins(tmp_path, photos="noise")
    first, labels = data.build_mnistm(tmp_path, train=True)
    cached = sorted((tmp_path / "cache").glob("mnistm-train-*.npy"))
    assert len(cached) == 1
    again, _ = data.build_mnistm(tmp_path, train=True)
    assert isinstance(again, np.memmap) and np.array_equal(first, again)   # read back from the cache
    cached[0].unlink()
    rebuilt, _ = data.build_mnistm(tmp_path, train=True)
    assert np.array_equal(first, rebuilt)                                  # same seed, same bytes
    other, _ = data.build_mnistm(tmp_path, train=True, seed=1)
    assert not np.array_equal(first, other)                                # other patches
    grey = data.mnistm_dataset(tmp_path, True, create_model("lenet5").input_spec)   # 1 x 28: fitted
    assert grey.images.shape == (20, 1, 28, 28)


def test_mnistm_errors_name_the_fix(tmp_path, monkeypatch):
    _stand_ins(tmp_path)
    photos = tmp_path / "mnistm" / "photos"
    (photos / "test" / "train0.png").write_bytes((photos / "train" / "train0.png").read_bytes())
    with pytest.raises(UserError, match="disjoint.*train0.png"):
        data.build_mnistm(tmp_path, train=False)
    (photos / "test" / "train0.png").unlink()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(photos / "test" / "tiny.png")
    with pytest.raises(UserError, match="smaller than MNIST-M's 32 x 32"):
        data.build_mnistm(tmp_path, train=False)
    empty = tmp_path / "empty"
    _stand_ins(empty)
    for split in ("train", "test"):
        for p in (empty / "mnistm" / "photos" / split).iterdir():
            p.unlink()
        (empty / "mnistm" / "photos" / split).rmdir()
    monkeypatch.setattr(data, "_skimage_data_dir", lambda: None)
    with pytest.raises(UserError, match="pip install --no-deps 'scikit-image"):
        data.build_mnistm(empty, train=True)
    with pytest.raises(UserError, match="MNIST-M has 10 classes"):
        data.mnistm_dataset(tmp_path, True, create_model("cifar_resnet8", num_classes=5).input_spec)


def test_teacher_trains_on_mnistm_with_crop_and_no_flip(tmp_path):
    _stand_ins(tmp_path, n=32, photos="noise")
    cfg = TeacherConfig(model="cifar_resnet8", out=str(tmp_path / "t.pt"), data="mnistm", data_root=str(tmp_path),
                        epochs=1, batch_size=16, workers=0, progress=False)
    metrics = train_teacher(cfg)
    assert metrics["epochs"] == 1 and 0 <= metrics["test_top1"] <= 100   # evaluated on MNIST-M's test split
    assert torch.load(tmp_path / "t.pt", weights_only=True)["extra"]["aug"] == "crop"


def test_crop_is_a_shifted_window_never_a_flip():
    from dfkd.distill.augment import train_augmentation
    from dfkd.distill.data import Augmentation, Batch

    x = torch.arange(4 * 3 * 32 * 32).remainder(251).to(torch.uint8).view(4, 3, 32, 32)
    torch.manual_seed(0)
    out = train_augmentation("crop", 32)(x.clone())
    padded = F.pad(x.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)
    for i in range(4):
        windows = [(t, l) for t in range(9) for l in range(9)
                   if torch.equal(out[i], padded[i, :, t:t + 32, l:l + 32])]
        assert windows, "not a window of the reflect-padded image"
    batch = Batch(x.clone(), torch.zeros(4, dtype=torch.int64), torch.zeros(4, 10))
    assert Augmentation("crop", 32)(batch).images.shape == x.shape


def test_mnistm100_pairs_two_digits_of_its_split_into_one_of_100_balanced_classes(tmp_path):
    """`mnistm100`: sample i is class i mod 100, its left digit of class (i mod 100) // 10 and its right one of class
    i mod 10 (both from the split's own digits, padded to 32 px, side by side, squeezed by area to 32 x 32), then the
    MNIST-M rule on the split's photographs; the same bytes on a rebuild; its own cache; a 100-class teacher trains
    on it and a 10-class model is refused."""
    _stand_ins(tmp_path, n=30)
    spec = create_model("cifar_resnet8", num_classes=100).input_spec
    train = data.real_dataset("mnistm100", spec, train=True, root=tmp_path)
    assert train.images.shape == (30, 3, 32, 32) and train.labels.tolist() == [i % 100 for i in range(30)]
    digits, labels = data.load_mnist(tmp_path, train=True)
    padded = F.pad(digits, (2, 2, 2, 2)).float()
    photo = np.array(TRAIN_COLOUR, np.int16)[:, None, None]
    for i in range(30):   # which digits were drawn: a pair of the right classes whose squeezed image gives this sample
        cands = [(a, b) for a in torch.nonzero(labels == (i % 100) // 10).squeeze(1).tolist()
                 for b in torch.nonzero(labels == i % 10).squeeze(1).tolist()]
        squeezed = [F.interpolate(torch.cat([padded[a], padded[b]], -1)[None, None], size=(32, 32), mode="area")
                    .round()[0, 0].numpy() for a, b in cands]
        assert any(np.array_equal(np.asarray(train.images[i]), np.abs(photo - s.astype(np.int16))) for s in squeezed), i
    again = data.build_mnistm(tmp_path, True, pairs=True)[0]
    assert np.array_equal(np.asarray(again), np.asarray(train.images))
    assert len(list((tmp_path / "cache").glob("mnistm100-train-*.npy"))) == 1
    assert data.num_classes_of("mnistm100") == 100 and "mnistm100" in data.dataset_names()
    with pytest.raises(UserError, match="mnistm100 has 100 classes but the model has 10"):
        data.real_dataset("mnistm100", create_model("cifar_resnet8").input_spec, train=False, root=tmp_path)
    cfg = TeacherConfig(model="cifar_resnet8", out=str(tmp_path / "t.pt"), data="mnistm100", data_root=str(tmp_path),
                        epochs=1, batch_size=16, workers=0, progress=False)
    assert train_teacher(cfg)["test_top1"] is not None
