"""Bad input and untrusted files: each crafted file is refused with one line that names it and the fix.

Checkpoints with pickled code, pickled arrays, decompression bombs, images of another format, manifests
that break the schema, shard members with unexpected names or sizes, damaged shards (refused, or
skipped with --on-bad-shard skip), and inputs that do not fit each other (caught before the first step).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import tarfile
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dfkd.common.errors import UserError
from dfkd.common.fileio import folder_lock, sha256_file
from dfkd.common.models import create_model, save_model_checkpoint, teacher_record
from dfkd.common.shards import (Sample, ShardFormatError, build_manifest, decode_image, encode_sample, read_manifest,
                                read_shard, sample_key, write_manifest, write_shard)
from dfkd.distill.cli import main as distill_cli
from dfkd.distill.data import Decoder
from dfkd.distill.train import TrainConfig, train
from dfkd.synth.cli import main as synth_cli
from dfkd.synth.generate import GenerateConfig, generate

SHARDS, PER_SHARD = 2, 16


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory, tiny_teacher_path):
    """Two shards of 16 random 28 px images labelled by the tiny teacher (a valid dataset to damage)."""
    folder = tmp_path_factory.mktemp("bad_input") / "shards"
    folder.mkdir()
    teacher = create_model("lenet5", weights=str(tiny_teacher_path)).eval()
    spec, rng, records = teacher.input_spec, np.random.default_rng(0), []
    for s in range(SHARDS):
        images = rng.integers(0, 256, (PER_SHARD, 28, 28, 1), dtype=np.uint8)
        with torch.no_grad():
            logits = teacher(spec.normalize(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255))
        logits = logits.numpy().astype(np.float16)
        samples = [Sample(sample_key(s * PER_SHARD + i), images[i], int(logits[i].argmax()), logits[i])
                   for i in range(PER_SHARD)]
        records.append(write_shard(folder / f"shard-{s:06d}.tar", samples))
    write_manifest(folder, build_manifest(teacher_record("lenet5", str(tiny_teacher_path), teacher), method="test",
                                          config={"seed": 0}, image_format="png", planned_samples=SHARDS * PER_SHARD,
                                          shard_size=PER_SHARD, shards=records, complete=True))
    return folder


@pytest.fixture
def dataset(clean_dataset, tmp_path):
    """A fresh copy of the clean dataset, free to damage."""
    return Path(shutil.copytree(clean_dataset, tmp_path / "shards"))


def train_config(shards: Path, out: Path, **overrides) -> TrainConfig:
    options = dict(shards=str(shards), student="lenet5_half", out=str(out), epochs=1, batch_size_per_rank=8, workers=0,
                   progress=False)
    return TrainConfig(**(options | overrides))


def distill_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--shards", str(shards), "--student", "lenet5_half", "--out", str(out), "--epochs", "1",
            "--batch-size-per-rank", "8", "--workers", "0", "--quiet", *extra]


def assert_one_line_error(result, *fragments: str) -> str:
    """A CLI result that is one `Error: ...` line holding every fragment, exit code 2, no traceback (after
    `synth generate`'s start line naming the recipe)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("recipe: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def install_shard(folder: Path, name: str, data: bytes, num_samples: int) -> None:
    """Replace a shard by `data` and record its checksum and sample count in the manifest, as a malicious
    but consistent share would (so that only the reader can catch it)."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    for record in manifest["shards"]:
        if record["name"] == name:
            manifest["planned_samples"] += num_samples - record["num_samples"]
            record["sha256"], record["size"] = sha256_file(folder / name), len(data)
            record["num_samples"] = num_samples
    (folder / "manifest.json").write_text(json.dumps(manifest))


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def good_members(index: int = 0) -> list[tuple[tarfile.TarInfo, bytes]]:
    sample = Sample(sample_key(index), np.zeros((28, 28, 1), np.uint8), 3, np.zeros(10, np.float16))
    return [(tarfile.TarInfo(name), data) for name, data in encode_sample(sample)]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit grey pixels, with almost no data (a bomb's shape)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# --------------------------------------------------------------------------- pickled checkpoints
def test_checkpoints_with_pickled_code_are_refused_everywhere(dataset, tiny_teacher_path, tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload(marker)}, evil)
    torch.load(evil, weights_only=False)  # control: an unsafe load does run the payload ...
    assert marker.exists()
    marker.unlink()
    runner = CliRunner()
    refusals = []

    def refused(result, *fragments: str) -> None:
        line = assert_one_line_error(result, *fragments, "pickled", "could run code, so it is refused")
        refusals.append(line)

    # ... the project's loaders never do
    result = runner.invoke(synth_cli, ["generate", "--teacher", "lenet5", "--weights", str(evil), "--out",
                                       str(tmp_path / "s"), "--quiet"])
    refused(result, str(evil), "not a plain-tensor PyTorch file")
    result = runner.invoke(distill_cli, distill_args(dataset, tmp_path / "r1", "--teacher-weights", str(evil)))
    refused(result, str(evil))
    result = runner.invoke(distill_cli, distill_args(dataset, tmp_path / "r2", "--student-weights", str(evil)))
    refused(result, str(evil))
    # a run's own checkpoint, swapped
    assert runner.invoke(distill_cli, distill_args(dataset, tmp_path / "r3")).exit_code == 0
    shutil.copy(evil, tmp_path / "r3" / "checkpoint.pt")
    result = runner.invoke(distill_cli, distill_args(dataset, tmp_path / "r3", "--resume"))
    refused(result, "r3/checkpoint.pt", "delete the run folder")
    # a run's student, swapped before its export
    shutil.copy(evil, tmp_path / "r3" / "student.pt")
    refused(runner.invoke(distill_cli, ["export", str(tmp_path / "r3")]), "r3/student.pt")
    # a generator checkpoint in synth's state folder, swapped
    sets = ["--set", "num_generators=1", "--set", "steps=2", "--set", "train_batch_size=8", "--set", "width=4"]
    args = ["generate", "--teacher", "lenet5", "--weights", str(tiny_teacher_path), "--out", str(tmp_path / "s2"),
            "--num-images", "8", "--shard-size", "8", "--quiet", *sets]
    assert runner.invoke(synth_cli, args).exit_code == 0
    shutil.copy(evil, tmp_path / "s2" / "state" / "generator-000.pt")
    refused(runner.invoke(synth_cli, args), "state/generator-000.pt", "delete it")
    assert not marker.exists()
    # never the advice to load a refused file unsafely (torch's own text for this error gives it)
    assert len(refusals) == 6 and not any("weights_only" in line or "False" in line for line in refusals), refusals


# --------------------------------------------------------------------------- arrays and images
def test_pickled_arrays_are_refused():
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ShardFormatError, match="not a plain .npy array"):
        decode_image(pickled.getvalue(), "npy")
    fields = {name.split(".", 1)[1]: data for name, data in encode_sample(
        Sample(sample_key(0), np.zeros((4, 4, 1), np.uint8), 1, np.zeros(10, np.float16)))}
    from dfkd.common.shards import decode_sample

    with pytest.raises(ShardFormatError, match="logits: not a plain .npy array"):
        decode_sample({"__key__": "sample-00000000", **fields, "logits.npy": pickled.getvalue()})


def test_decompression_bombs_are_refused_before_decoding():
    bomb = png_header_only(100_000, 100_000)  # 10^10 pixels: 10 GB if decoded
    start = time.perf_counter()
    with pytest.raises(ShardFormatError, match="exceeds the limit of 16777216 pixels"):
        decode_image(bomb, "png")
    assert time.perf_counter() - start < 0.5  # refused from the header, nothing decoded
    raw = io.BytesIO()
    np.lib.format.write_array_header_1_0(raw, {"descr": "|u1", "fortran_order": False, "shape": (5000, 5000, 1)})
    with pytest.raises(ShardFormatError):  # a .npy header that promises more than the member holds
        decode_image(raw.getvalue() + b"\0" * 100, "npy")
    # within the global limit but larger than the dataset's images: refused by the training reader
    big = io.BytesIO()
    Image.fromarray(np.zeros((56, 56), np.uint8)).save(big, format="PNG")
    fields = dict(good := {name.split(".", 1)[1]: data for name, data in encode_sample(
        Sample(sample_key(0), np.zeros((28, 28, 1), np.uint8), 1, np.zeros(10, np.float16)))})
    fields.update({"__key__": "sample-00000000", "png": big.getvalue()})
    spec = create_model("lenet5").input_spec
    with pytest.raises(ShardFormatError, match="56x56 pixels exceeds the limit of 784"):
        Decoder(spec)(fields)
    assert Decoder(spec)({"__key__": "sample-00000000", **good}).image.shape == (28, 28, 1)


@pytest.mark.parametrize("fmt, pil_format", [("png", "GIF"), ("png", "JPEG"), ("jpg", "PNG"), ("png", "TIFF")])
def test_image_members_must_be_their_declared_format(fmt, pil_format):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format=pil_format)
    with pytest.raises(ShardFormatError, match=f"undecodable {fmt} image"):
        decode_image(buf.getvalue(), fmt)


# --------------------------------------------------------------------------- manifests
def _mutations():
    def set_(path, value):
        def mutate(d):
            target = d
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        return mutate

    def delete(key):
        return lambda d: d.pop(key)

    return {
        "version": (set_(["format_version"], 2), "format version 2"),
        "format": (set_(["format"], "something-else"), "is not a dfkd-webdataset manifest"),
        "negative count": (set_(["shards", 0, "num_samples"], -1), "shards[0].num_samples must be an integer >= 0"),
        "count as text": (set_(["shards", 0, "num_samples"], "16"), "shards[0].num_samples must be an integer"),
        "bad sha": (set_(["shards", 1, "sha256"], "abc"), "shards[1].sha256 must be a sha256"),
        "path traversal": (set_(["shards", 0, "name"], "../../etc/x.tar"), "shards[0].name must be a plain file name"),
        "hidden name": (set_(["shards", 0, "name"], ".shard.tar"), "shards[0].name must be a plain file name"),
        "missing field": (delete("shard_size"), "shard_size is missing"),
        "class mismatch": (set_(["num_classes"], 7), "num_classes is 7 but teacher.input_spec.num_classes is 10"),
        "bad std": (set_(["teacher", "input_spec", "std"], [0]), "teacher.input_spec.std must be a list of 1 positive"),
        "complete but short": (set_(["planned_samples"], 99), "marked complete but its shards hold 32 samples"),
        "duplicate shard": (lambda d: d["shards"].append(dict(d["shards"][0])), "lists shard-000000.tar twice"),
        "not an object": (lambda d: d["shards"].__setitem__(0, ["x"]), "shards[0] must be a JSON object"),
        "bool as int": (set_(["shard_size"], True), "shard_size must be an integer >= 1"),
    }


@pytest.mark.parametrize("case", _mutations())
def test_manifests_breaking_the_schema_are_refused(dataset, case):
    mutate, message = _mutations()[case]
    d = json.loads((dataset / "manifest.json").read_text())
    mutate(d)
    (dataset / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="manifest.json") as error:
        read_manifest(dataset)
    assert message in error.value.message and "\n" not in error.value.message
    assert "regenerate the shards" in error.value.message


def test_unreadable_manifests_are_refused(dataset, tmp_path):
    runner = CliRunner()
    (dataset / "manifest.json").write_text("[" * 100_000)  # nesting bomb
    assert_one_line_error(runner.invoke(distill_cli, distill_args(dataset, tmp_path / "r")),
                          "manifest.json is not valid JSON", "regenerate the shards")
    result = runner.invoke(synth_cli, ["verify", str(dataset)])
    assert_one_line_error(result, "manifest.json is not valid JSON")
    with open(dataset / "manifest.json", "wb") as f:
        f.truncate(65 << 20)  # sparse, larger than any manifest
    assert_one_line_error(runner.invoke(synth_cli, ["verify", str(dataset)]), "over the", "limit for a manifest")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- shard members
def _bad_shards() -> dict[str, tuple[bytes, str]]:
    def renamed(new_name):
        members = good_members()
        members[1] = (tarfile.TarInfo(new_name), members[1][1])
        return tar_bytes(members)

    symlink = tarfile.TarInfo("sample-00000000.cls")
    symlink.type, symlink.linkname = tarfile.SYMTYPE, "/etc/passwd"
    oversize_header = tarfile.TarInfo("sample-00000000.png")
    oversize_header.size = 1 << 30
    pickled = io.BytesIO()
    np.save(pickled, np.array([None], dtype=object), allow_pickle=True)
    return {
        "path traversal": (renamed("../../sample-00000000.cls"), "unexpected member name '../../sample-00000000.cls'"),
        "unknown field": (renamed("sample-00000000.exe"), "unexpected member name 'sample-00000000.exe'"),
        "unknown key": (renamed("evil.cls"), "unexpected member name 'evil.cls'"),
        "oversize class": (tar_bytes(good_members()[:1] + [(tarfile.TarInfo("sample-00000000.cls"), b"1" * 100)]
                                     + good_members()[2:]), "is 100 bytes, over the 32-byte limit for .cls"),
        "header claims 1 GiB": (oversize_header.tobuf(tarfile.USTAR_FORMAT), "1073741824 bytes, over the"),
        "symlink": (tar_bytes(good_members()[:1] + [(symlink, b"")]), "is not a regular file"),
        "pickled logits": (tar_bytes(good_members()[:2] + [(tarfile.TarInfo("sample-00000000.logits.npy"),
                                                            pickled.getvalue())] + good_members()[3:]),
                           "not a plain .npy array"),
        "bomb image": (tar_bytes([(tarfile.TarInfo("sample-00000000.png"), png_header_only(60000, 60000))]
                                 + good_members()[1:]), "exceeds the limit"),
    }


@pytest.mark.parametrize("case", _bad_shards())
def test_crafted_shard_members_are_rejected(dataset, tmp_path, case):
    data, message = _bad_shards()[case]
    (tmp_path / "crafted.tar").write_bytes(data)
    with pytest.raises(ShardFormatError, match="crafted.tar") as error:
        list(read_shard(tmp_path / "crafted.tar"))
    assert message in str(error.value)
    # shared with a manifest that matches it byte for byte: only the reader stands in the way
    install_shard(dataset, "shard-000001.tar", data, num_samples=1)
    result = CliRunner().invoke(synth_cli, ["verify", str(dataset)])
    bad = [line for line in result.output.splitlines() if line.startswith("BAD  shard-000001.tar: ")]
    assert result.exit_code == 1 and len(bad) == 1 and message in bad[0], result.output
    result = CliRunner().invoke(distill_cli, distill_args(dataset, tmp_path / "run"))
    assert_one_line_error(result, "shard-000001.tar", message, "synth verify")
    assert not (tmp_path / "run").exists()  # found while reading, in the first epoch: no run folder is left


def test_a_run_stopped_before_its_first_checkpoint_leaves_only_what_was_there(dataset, tmp_path, monkeypatch):
    """Damage found while reading (here: a class that is not a number, past the size check) stops the run
    in its first epoch: the run folder it made is removed, a folder that was there keeps only its own
    files, and a run with a checkpoint keeps everything."""
    good = (dataset / "shard-000001.tar").read_bytes()
    bad = tar_bytes(good_members()[:1] + [(tarfile.TarInfo("sample-00000000.cls"), b"x")] + good_members()[2:])
    install_shard(dataset, "shard-000001.tar", bad, num_samples=1)
    message = "class is not an ASCII integer"
    with pytest.raises(UserError, match=message):
        train(train_config(dataset, tmp_path / "new" / "run"))
    assert not (tmp_path / "new").exists()   # parents it made too
    from dfkd.distill.run_folder import FolderBefore, remove_unstarted

    before = FolderBefore.of(tmp_path / "shared" / "run")   # a parent that another run's folder moves into
    (tmp_path / "shared" / "run").mkdir(parents=True)
    (tmp_path / "shared" / "other").mkdir()
    remove_unstarted(tmp_path / "shared" / "run", before)
    assert [p.name for p in (tmp_path / "shared").iterdir()] == ["other"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    with pytest.raises(UserError, match=message):
        train(train_config(dataset, mine))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # a run that stops after its first checkpoint: nothing of it is removed
    install_shard(dataset, "shard-000001.tar", good, num_samples=PER_SHARD)
    from dfkd.distill import train as train_module

    epoch_of = train_module.train_one_epoch

    def fails_in_epoch_2(*args, **kwargs):
        if args[5] == 1:
            raise UserError("stopped in epoch 2")
        return epoch_of(*args, **kwargs)
    monkeypatch.setattr(train_module, "train_one_epoch", fails_in_epoch_2)
    with pytest.raises(UserError, match="stopped in epoch 2"):
        train(train_config(dataset, tmp_path / "run", epochs=2))
    assert {"checkpoint.pt", "config.json", "metrics.csv"} <= {p.name for p in (tmp_path / "run").iterdir()}


# --------------------------------------------------------------------------- damaged shards: refuse or skip
def test_damaged_shard_is_refused_before_the_first_step_or_skipped(dataset, tmp_path):
    shard = dataset / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])  # truncated
    runner = CliRunner()
    result = runner.invoke(distill_cli, distill_args(dataset, tmp_path / "a"))
    assert_one_line_error(result, "1 of 2 shards", "shard-000001.tar: 5000 bytes, the manifest says",
                          "--on-bad-shard skip", "synth verify")
    assert not (tmp_path / "a").exists()  # refused before the run folder was made
    result = runner.invoke(distill_cli, distill_args(dataset, tmp_path / "b", "--on-bad-shard", "skip"))
    assert result.exit_code == 0, result.output
    assert "skipped_shards 1" in result.output
    assert "warning: skipping 1 of 2 shards (16 of 32 samples)" in result.stderr
    # the size check alone catches truncation too; with no check the reader still does, mid-epoch
    assert train(train_config(dataset, tmp_path / "c", verify_shards="size", on_bad_shard="skip"))[
        "skipped_shards"] == 1
    with pytest.raises(UserError, match="bad shard data in .*shard-000001.tar: truncated.*synth verify"):
        train(train_config(dataset, tmp_path / "d", verify_shards="none"))
    assert not (tmp_path / "d").exists()


def test_corrupt_sample_in_a_shard_of_the_right_size(dataset, tmp_path, capfd):
    shard = dataset / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        offset = tar.getmember("sample-00000003.cls").offset_data
    data = bytearray(shard.read_bytes())
    data[offset] = ord("x")  # same size, another sha256
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="shard-000000.tar: sha256 differs from the manifest"):
        train(train_config(dataset, tmp_path / "a"))
    with pytest.raises(UserError, match="sample-00000003: class is not an ASCII integer"):
        train(train_config(dataset, tmp_path / "b", verify_shards="size"))
    metrics = train(train_config(dataset, tmp_path / "c", verify_shards="size", on_bad_shard="skip"))
    assert metrics["skipped_shards"] == 0 and metrics["epochs"] == 1
    assert "warning: skipping a sample of shard-000000.tar (--on-bad-shard skip): sample sample-00000003" in \
        capfd.readouterr().err


# --------------------------------------------------------------------------- mismatched inputs
def test_student_that_cannot_take_the_input_size_is_caught_first(tmp_path):
    noise = generate(GenerateConfig(teacher="cifar_resnet8", weights="none", out=str(tmp_path / "n12"),
                                    method="noise", resolution=12, num_images=20, shard_size=10, progress=False))
    assert noise.input_spec.size == 12
    result = CliRunner().invoke(distill_cli, distill_args(tmp_path / "n12", tmp_path / "run"))
    assert_one_line_error(result, "student lenet5_half cannot take the shards' 3 x 12 x 12 images",
                          "choose a student that takes 12 px input", "--resolution")
    assert not (tmp_path / "run").exists()


def test_student_weights_for_other_classes_say_what_to_do(dataset, tmp_path):
    save_model_checkpoint(tmp_path / "five.pt", create_model("lenet5_half", num_classes=5))
    result = CliRunner().invoke(distill_cli, distill_args(dataset, tmp_path / "run", "--student-weights",
                                                          str(tmp_path / "five.pt")))
    assert_one_line_error(result, "five.pt has 5 classes, not 10", "Pass --student-weights none")
    assert not (tmp_path / "run").exists()


def test_messages_name_the_real_cause(dataset, tmp_path):
    """A model name that builds nothing, a refused or missing file, a folder given as a file, a shards
    folder given as a run: each said as what it is (not "does not fit the shards", not "does not exist")."""
    runner = CliRunner()
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload(tmp_path / "ran")}, tmp_path / "evil.pt")
    (tmp_path / "folder").mkdir()
    for extra, fragment in ((["--student", "timm/no_such_net"], "timm has no model 'no_such_net'"),
                            (["--student", "no_such_pkg.nets:build"], "cannot import 'no_such_pkg.nets'"),
                            (["--student-weights", str(tmp_path / "evil.pt")], "could run code, so it is refused"),
                            (["--student-weights", str(tmp_path / "folder")], "is a folder, not a checkpoint file"),
                            (["--teacher-weights", str(tmp_path / "folder")], "is a folder, not a checkpoint file")):
        line = assert_one_line_error(runner.invoke(distill_cli, distill_args(dataset, tmp_path / "run", *extra)),
                                     fragment)
        assert "does not fit" not in line and "does not exist" not in line, line
        assert not (tmp_path / "run").exists()
    line = assert_one_line_error(runner.invoke(synth_cli, ["generate", "--teacher", "lenet5", "--weights",
                                                           str(tmp_path / "folder"), "--out", str(tmp_path / "s")]),
                                 f"weights {tmp_path / 'folder'} is a folder, not a checkpoint file")
    assert "does not exist" not in line
    for command in ("export", "report"):
        assert_one_line_error(runner.invoke(distill_cli, [command, str(tmp_path / "gone")]),
                              f"run folder {tmp_path / 'gone'} does not exist", "--out folder of a `distill train` run")
        line = assert_one_line_error(runner.invoke(distill_cli, [command, str(dataset)]),
                                     f"{dataset} is a shards folder", f"`distill {command} RUN`")
        assert "is the run finished" not in line
    assert_one_line_error(runner.invoke(distill_cli, ["export", str(tmp_path / "folder")]),
                          "is not a `distill train` run folder (it has no config.json and no student.pt)")


@pytest.mark.parametrize("recorded", [{"foo": 1}, {"channels": 1, "size": 28, "mean": [0.1], "std": [0.3]},
                                      ["not", "a", "dict"], {"channels": "x", "size": 28, "mean": [0.1],
                                                             "std": [0.3], "num_classes": 10}])
def test_checkpoint_with_a_malformed_input_spec_is_a_one_line_error(dataset, tmp_path, recorded):
    """As teacher (`synth generate --weights`) and as student (`distill train --student-weights`)."""
    model = create_model("lenet5_half")
    torch.save({"arch": "lenet5_half", "input_spec": recorded, "state_dict": model.state_dict()},
               tmp_path / "odd.pt")
    result = CliRunner().invoke(synth_cli, ["generate", "--teacher", "lenet5_half", "--weights",
                                            str(tmp_path / "odd.pt"), "--out", str(tmp_path / "s"),
                                            "--num-images", "4", "--quiet"])
    line = assert_one_line_error(result, f"checkpoint {tmp_path / 'odd.pt'} has an input_spec", "save the model again")
    assert "KeyError" not in line and not (tmp_path / "s").exists()
    result = CliRunner().invoke(distill_cli, distill_args(dataset, tmp_path / "run", "--student-weights",
                                                          str(tmp_path / "odd.pt")))
    assert_one_line_error(result, f"checkpoint {tmp_path / 'odd.pt'} has an input_spec", "bare state_dict")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- evaluation data
def write_image_folder(folder: Path) -> Path:
    """An ImageFolder tree of 10 classes x 2 grey 28 px PNGs."""
    rng = np.random.default_rng(1)
    for c in range(10):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"c{c}" / f"{i}.png")
    return folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("stored", [False, True])
def test_damaged_evaluation_image_is_refused_before_the_first_step(dataset, tmp_path, stored):
    images = write_image_folder(tmp_path / "eval")
    truncate(images / "c3" / "1.png")
    extra = ["--teacher-logits", "stored", "--aug", "none"] if stored else []
    result = CliRunner().invoke(distill_cli, distill_args(dataset, tmp_path / "run", "--eval-data", str(images),
                                                          *extra))
    assert_one_line_error(result, f"1 of 20 images in {images} cannot be read", str(images / "c3" / "1.png"),
                          "replace or remove them")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cached", [True, False])
def test_damaged_teacher_training_image_is_a_one_line_error(tmp_path, monkeypatch, cached):
    """distill teacher --data FOLDER: decoded into the uint8 cache (small images) or checked (streamed);
    either way the damaged file is named before training, and no cache or checkpoint is written."""
    if not cached:
        monkeypatch.setattr("dfkd.distill.datasets.CACHE_MAX_SIZE", 0)
    images = write_image_folder(tmp_path / "train")
    truncate(images / "c5" / "0.png")
    result = CliRunner().invoke(distill_cli, ["teacher", "--model", "lenet5", "--data", str(images), "--data-root",
                                              str(tmp_path / "root"), "--out", str(tmp_path / "t.pt"), "--epochs",
                                              "1", "--batch-size", "4", "--workers", "0", "--quiet"])
    assert_one_line_error(result, f"1 of 20 images in {images} cannot be read", str(images / "c5" / "0.png"),
                          "replace or remove them")
    assert not (tmp_path / "t.pt").exists() and not list(tmp_path.glob("root/cache/*.npy"))


@pytest.mark.parametrize("workers", [0, 1])
def test_evaluation_failing_mid_run_keeps_the_trained_epoch(dataset, tmp_path, monkeypatch, workers):
    """An image damaged after the start-up check (here: the check is skipped): the epoch is checkpointed
    before the error, and --resume evaluates it and ends bit-identical to an uninterrupted run."""
    # streamed, not decoded into the uint8 cache (which is the check: a cached folder cannot fail mid-run)
    monkeypatch.setattr("dfkd.distill.datasets.CACHE_MAX_SIZE", 0)
    images = write_image_folder(tmp_path / "eval")
    options = dict(eval_data=str(images), teacher_logits="stored", aug="none", epochs=2, workers=workers)
    reference = train(train_config(dataset, tmp_path / "ref", **options))
    good = (images / "c3" / "1.png").read_bytes()
    truncate(images / "c3" / "1.png")
    monkeypatch.setattr("dfkd.distill.datasets.check_images", lambda *args, **kwargs: None)
    with pytest.raises(UserError, match=r"evaluating epoch 1 on .* failed \(.*c3/1.png: .*\); the epoch is saved"):
        train(train_config(dataset, tmp_path / "run", **options))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["history"][0]["eval_top1"] is None
    with pytest.raises(UserError, match=r"evaluating the teacher on .* failed \(.*c3/1.png: "):  # online: at start
        train(train_config(dataset, tmp_path / "online", **(options | dict(teacher_logits="online"))))
    (images / "c3" / "1.png").write_bytes(good)
    resumed = train(train_config(dataset, tmp_path / "run", resume=True, **options))
    assert resumed["eval_top1"] == reference["eval_top1"]
    ref, run = (torch.load(p / "student.pt", weights_only=True)["state_dict"] for p in (tmp_path / "ref",
                                                                                        tmp_path / "run"))
    assert all(torch.equal(ref[k], run[k]) for k in ref)
    columns = ["epoch", "train_loss", "eval_top1"]
    assert (np.genfromtxt(tmp_path / "run" / "metrics.csv", delimiter=",", names=True)[columns].tolist()
            == np.genfromtxt(tmp_path / "ref" / "metrics.csv", delimiter=",", names=True)[columns].tolist())


def test_run_folder_of_another_config_or_the_shards_folder_is_refused(dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**asdict(train_config(dataset, run, recipe="none")), "lr": 0.5}))
    with pytest.raises(UserError, match=r"start of another run \(config.json differs: lr 0.5 -> 0.1"):
        train(train_config(dataset, run, recipe="none"))
    with pytest.raises(UserError, match="is the shards folder"):
        train(train_config(dataset, dataset))


def test_unfinished_shards_folder_is_refused(dataset, tmp_path):
    d = json.loads((dataset / "manifest.json").read_text())
    d["complete"] = False
    (dataset / "manifest.json").write_text(json.dumps(d))
    assert_one_line_error(CliRunner().invoke(distill_cli, distill_args(dataset, tmp_path / "run")),
                          "is unfinished", "rerun the same `synth generate`")


@contextlib.contextmanager
def locked_by_another_process(folder: Path, command: str):
    """A forked child holds the folder's lock (as a still-running job would) until the block ends."""
    ready_read, ready_write = os.pipe()
    stop_read, stop_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        with folder_lock(folder, command):
            os.write(ready_write, b"x")
            os.read(stop_read, 1)
        os._exit(0)
    os.read(ready_read, 1)
    try:
        yield pid
    finally:
        os.write(stop_write, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_read, ready_write, stop_read, stop_write):
            os.close(fd)


def test_second_writer_into_a_folder_is_refused(dataset, tmp_path, tiny_teacher_path):
    out = tmp_path / "out"
    out.mkdir()
    config = GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path), out=str(out), num_images=8,
                            shard_size=8, progress=False, method="noise")
    with locked_by_another_process(out, "synth generate") as pid:  # a run still writing there
        with pytest.raises(UserError, match=rf"being written by another running `synth generate` \(pid {pid} on host "):
            generate(config)
    assert generate(config).complete  # the holder has ended: the folder is free again
    run = tmp_path / "run"
    run.mkdir()
    with locked_by_another_process(run, "distill train"):
        with pytest.raises(UserError, match="being written by another running `distill train`"):
            train(train_config(dataset, run))
