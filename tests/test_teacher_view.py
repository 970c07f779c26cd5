"""`distill train --teacher-view native`: the online teacher sees each image at the native resolution its
shard records (MUSE's low-resolution streams), downsampled from the student's view (tiny shards)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd.common.errors import UserError
from dfkd.common.models import InputSpec, create_model, save_model_checkpoint, teacher_record
from dfkd.common.shards import Sample, build_manifest, read_manifest, write_manifest, write_shard
from dfkd.distill.data import ShardLoader
from dfkd.distill.nets import native_view_logits
from dfkd.distill.train import TrainConfig, train

SIZES = (7, 14, 28)   # what a MUSE synthesis at scales 1/4, 1/2, 1 records for a 28 px teacher


class SizeRecorder(nn.Module):
    """A stand-in teacher whose logits depend on its input size and pixels; records the sizes it saw."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.shape[-1])
        return torch.stack([x.mean((1, 2, 3)) * x.shape[-1], x.amax((1, 2, 3))], 1)


def test_each_image_reaches_the_teacher_at_its_native_size():
    torch.manual_seed(0)
    images = torch.rand(6, 1, 28, 28)
    resolution = torch.tensor([7, 14, 28, 7, 0, 14])   # 0: nothing recorded (the image as it is)
    spec = InputSpec(size=28, channels=1, mean=(0.0,), std=(1.0,), num_classes=2)
    teacher = SizeRecorder()
    logits = native_view_logits(teacher, spec, images, resolution, torch.arange(6))
    assert sorted(teacher.seen) == [7, 14, 28]   # one pass per distinct size
    for i, r in enumerate([7, 14, 28, 7, 28, 14]):
        view = images[i:i + 1] if r == 28 else F.interpolate(images[i:i + 1], size=(r, r), mode="area")
        assert torch.allclose(logits[i], SizeRecorder()(view)[0], atol=1e-6), i
    # a mixed pair is seen at the larger native size of its two images
    teacher.seen.clear()
    perm = torch.tensor([1, 0, 2, 4, 3, 5])   # image 0 (7 px) mixed with image 1 (14 px), 3 (7) with 4 (none)
    logits = native_view_logits(teacher, spec, images, resolution, perm)
    view = F.interpolate(images[:1], size=(14, 14), mode="area")
    assert torch.allclose(logits[0], SizeRecorder()(view)[0], atol=1e-6)
    assert torch.allclose(logits[3], SizeRecorder()(images[3:4])[0], atol=1e-6)   # "none recorded" = full size


def write_muse_like(folder: Path, teacher: nn.Module, weights: Path) -> Path:
    """Two shards of random 28 px images whose metadata records MUSE-like native sizes (SIZES)."""
    folder.mkdir(parents=True)
    rng, records, per_shard = np.random.default_rng(0), [], 48
    for s in range(2):
        images = rng.integers(0, 256, (per_shard, 28, 28, 1), dtype=np.uint8)
        with torch.no_grad():
            logits = teacher(teacher.input_spec.normalize(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255))
        samples = [Sample(f"sample-{s * per_shard + i:08d}", images[i], i % 10, logits[i].numpy().astype(np.float16),
                          {"resolution": SIZES[i % 3], "method": "muse"}) for i in range(per_shard)]
        records.append(write_shard(folder / f"shard-{s:06d}.tar", samples))
    write_manifest(folder, build_manifest(teacher_record(teacher.arch, str(weights), teacher), method="muse",
                                          config={"seed": 0}, image_format="png", planned_samples=2 * per_shard,
                                          shard_size=per_shard, shards=records, complete=True))
    return folder


@pytest.fixture(scope="module")
def muse_like_shards(tmp_path_factory):
    """MUSE-like shards of a ResNet teacher (takes any input size), 1 x 28 px, random weights."""
    root = tmp_path_factory.mktemp("teacher_view")
    torch.manual_seed(0)
    teacher = create_model("cifar_resnet8", in_chans=1, input_size=28).eval()
    save_model_checkpoint(root / "resnet8.pt", teacher)
    return write_muse_like(root / "shards", teacher, root / "resnet8.pt")


def config(shards, out, **overrides) -> TrainConfig:
    return TrainConfig(**dict(shards=str(shards), student="lenet5_half", out=str(out), epochs=1, batch_size_per_rank=16,
                              workers=0, progress=False, mixup=1.0) | overrides)


def test_the_loader_carries_native_sizes_only_when_asked(muse_like_shards):
    manifest = read_manifest(muse_like_shards)
    batch = next(iter(ShardLoader(muse_like_shards, manifest, 16, workers=0, with_meta=True).epoch(0)))
    assert batch.resolution is not None and set(batch.resolution.tolist()) <= set(SIZES)
    assert batch.resolution.tolist() == [SIZES[i % 3] for i in batch.index.tolist()]
    assert next(iter(ShardLoader(muse_like_shards, manifest, 16, workers=0).epoch(0))).resolution is None


def test_native_view_trains_and_changes_the_teachers_targets(muse_like_shards, tmp_path):
    stored = train(config(muse_like_shards, tmp_path / "stored"))
    native = train(config(muse_like_shards, tmp_path / "native", teacher_view="native"))
    assert stored["epochs"] == native["epochs"] == 1
    # same seed, same samples, same augmentation draws: only the teacher's view differs
    assert native["train_loss"] != pytest.approx(stored["train_loss"], rel=1e-4)
    with pytest.raises(UserError, match="--teacher-logits online"):
        train(config(muse_like_shards, tmp_path / "x", teacher_view="native", teacher_logits="stored", aug="none",
                     mixup=0.0))


def test_a_teacher_that_cannot_take_the_native_sizes_is_a_user_error(tmp_path, tiny_teacher_path):
    lenet = create_model("lenet5", weights=str(tiny_teacher_path)).eval()   # 28 px only
    shards = write_muse_like(tmp_path / "shards", lenet, tiny_teacher_path)
    with pytest.raises(UserError, match="cannot take the 7 px images.*--teacher-view stored"):
        train(config(shards, tmp_path / "run", teacher_view="native"))
