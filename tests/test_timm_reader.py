"""Outside readers: timm's `wds/` dataset reads every shard format we mark timm-readable with the right
count, labels and pixels, and refuses (not silently empties) the one we mark unreadable (npy); a reader
written from docs/shard-format.md alone gets our samples; webdataset's secure mode refuses pickle members."""
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfkd.common.models import InputSpec
from dfkd.common.shards import (IMAGE_FORMATS, TIMM_READABLE_FORMATS, Manifest, Sample, ShardFormatError, TeacherRecord,
                                build_manifest, read_manifest, read_shard, sample_key, write_manifest, write_shard)

timm_data = pytest.importorskip("timm.data", reason="timm is a test extra: pip install -e .[test]")

SHARDS, PER_SHARD = 2, 7


def write_dataset(folder, image_format: str, channels: int) -> Manifest:
    """Two shards of random images, labels i % 10, written by the functions `synth generate` uses."""
    folder.mkdir()
    rng = np.random.default_rng(channels)
    records = []
    for s in range(SHARDS):
        samples = [Sample(sample_key(s * PER_SHARD + i), rng.integers(0, 256, (12, 12, channels), dtype=np.uint8),
                          (s * PER_SHARD + i) % 10, rng.standard_normal(10).astype(np.float16), {"stream": 0})
                   for i in range(PER_SHARD)]
        records.append(write_shard(folder / f"shard-{s:06d}.tar", samples, image_format))
    spec = {"channels": channels, "size": 12, "mean": [0.5] * channels, "std": [0.25] * channels, "num_classes": 10}
    teacher = TeacherRecord(arch="x", weights="none", weights_path=None, weights_sha256="a" * 64, input_spec=spec)
    manifest = build_manifest(teacher, method="test", config={}, image_format=image_format,
                              planned_samples=SHARDS * PER_SHARD, shard_size=PER_SHARD, shards=records, complete=True)
    write_manifest(folder, manifest)
    return manifest


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("image_format", IMAGE_FORMATS)
def test_timm_reads_every_format_marked_readable_and_refuses_the_others(tmp_path, image_format, channels):
    folder = tmp_path / "shards"
    write_dataset(folder, image_format, channels)
    readable = image_format in TIMM_READABLE_FORMATS
    manifest = json.loads((folder / "manifest.json").read_text())
    info = json.loads((folder / "_info.json").read_text())
    assert manifest["timm_readable"] is readable and info["timm_readable"] is readable
    assert read_manifest(folder).num_samples == SHARDS * PER_SHARD  # the extra field reads back
    if not readable:
        assert "timm" in info["note"] and "splits" not in info
        with pytest.raises(RuntimeError, match="split train not found"):  # loud, not 0 of N samples
            timm_data.create_dataset("wds/ours", root=str(folder), split="train", is_training=False, batch_size=1)
        return
    dataset = timm_data.create_dataset("wds/ours", root=str(folder), split="train", is_training=False, batch_size=1)
    ours = [s for p in sorted(folder.glob("shard-*.tar")) for s in read_shard(p)]
    theirs = list(dataset)
    assert len(dataset) == len(theirs) == len(ours) == SHARDS * PER_SHARD
    assert [int(target) for _, target in theirs] == [s.label for s in ours]
    for (image, _), sample in zip(theirs, ours):  # timm converts to RGB: grey is repeated in every channel
        pixels = np.asarray(image)
        assert pixels.shape == (12, 12, 3)
        assert np.array_equal(pixels if channels == 3 else pixels[:, :, :1], sample.image)


SHARD_FORMAT_DOC = Path(__file__).resolve().parents[1] / "docs" / "shard-format.md"


def shard_format_section() -> str:
    return SHARD_FORMAT_DOC.read_text()


@pytest.mark.parametrize("image_format", IMAGE_FORMATS)
def test_a_reader_written_from_the_readme_alone_gets_our_samples_and_teacher_input(tmp_path, image_format):
    """tarfile + numpy + Pillow, following docs/shard-format.md (which must state each rule
    used here), give the images, labels, logits and teacher input of our own reader."""
    section = " ".join(shard_format_section().split())
    for rule in ("WDS_SECURE=1", "(H, W, C)", "C = 1 for grey", "grey PNG (or JPEG) decodes as a 2-D (H, W) array",
                 "x = pixels / 255", "`(x[c] - mean[c]) / std[c]`", "allow_pickle=False", "timm_readable"):
        assert rule in section, rule
    folder = tmp_path / "shards"
    write_dataset(folder, image_format, 1)
    spec = json.loads((folder / "manifest.json").read_text())["teacher"]["input_spec"]
    ours = {s.key: s for p in sorted(folder.glob("shard-*.tar")) for s in read_shard(p)}
    seen = 0
    for path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, field = member.name.partition(".")
                data = tar.extractfile(member).read()
                if field == image_format:
                    if field == "npy":
                        pixels = np.load(io.BytesIO(data), allow_pickle=False)
                    else:
                        pixels = np.asarray(Image.open(io.BytesIO(data)))
                        assert pixels.ndim == 2  # grey
                        pixels = pixels[:, :, None]
                    assert np.array_equal(pixels, ours[key].image)
                    x = pixels.transpose(2, 0, 1).astype(np.float32) / 255
                    x = (x - np.array(spec["mean"])[:, None, None]) / np.array(spec["std"])[:, None, None]
                    expected = InputSpec.from_dict(spec).normalize(
                        torch.from_numpy(ours[key].image.copy()).permute(2, 0, 1)[None].float() / 255)[0]
                    np.testing.assert_allclose(x, expected.numpy(), rtol=1e-6, atol=1e-6)
                    seen += 1
                elif field == "cls":
                    assert int(data.decode("ascii")) == ours[key].label
                elif field == "logits.npy":
                    assert np.array_equal(np.load(io.BytesIO(data), allow_pickle=False), ours[key].logits)
    assert seen == SHARDS * PER_SHARD


def test_webdataset_secure_mode_refuses_a_pickle_member(tmp_path):
    """What docs/shard-format.md tells outside readers: WDS_SECURE=1 stops plain webdataset from unpickling a
    tampered shard's `.pyd` member (our own reader refuses any unknown member anyway)."""
    shard = tmp_path / "tampered.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in (("sample-00000000.cls", b"1"), ("sample-00000000.pyd", pickle.dumps({"a": 1}))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    script = ("import webdataset as wds, sys\n"
              f"ds = wds.WebDataset({str(shard)!r}, shardshuffle=False).decode()\n"
              "print(next(iter(ds))['pyd'])\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    secure = subprocess.run([sys.executable, "-c", script], env=env | {"WDS_SECURE": "1"}, capture_output=True,
                            text=True, timeout=120)
    assert "{'a': 1}" in plain.stdout, plain.stderr        # plain mode unpickles it
    assert secure.returncode != 0 and "Unpickling is not allowed" in secure.stderr, secure.stdout
    with pytest.raises(ShardFormatError, match="unexpected member name"):
        list(read_shard(shard))
