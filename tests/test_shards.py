import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from dfkd.common.errors import UserError
from dfkd.common.shards import (IMAGE_FORMATS, VAL_SPLIT, Sample, ShardFormatError, TeacherRecord, build_manifest,
                                decode_sample, held_out_folder, read_held_out, read_manifest, read_shard, sample_key,
                                shard_paths, verify_dataset, write_manifest, write_shard)


def _samples(n, channels=1, size=28, classes=10, seed=0, first=0):
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 150, size)
    smooth = (ramp[:, None, None] + ramp[None, :, None] * 0.25 + np.zeros((1, 1, channels)))  # JPEG-friendly

    def image():
        return (smooth + rng.integers(0, 50, (1, 1, channels))).astype(np.uint8)

    return [Sample(sample_key(first + i), image(), i % classes,
                   rng.standard_normal(classes).astype(np.float16), {"stream": i % 3}) for i in range(n)]


def _manifest(records, complete=True):
    spec = {"channels": 1, "size": 28, "mean": [0.1307], "std": [0.3081], "num_classes": 10}
    teacher = TeacherRecord(arch="lenet5", weights="t.pt", weights_path=None, weights_sha256="ab" * 32,
                            input_spec=spec)
    return build_manifest(teacher, method="generator", config={"x": 1}, image_format="png",
                          planned_samples=sum(r.num_samples for r in records), shard_size=8, shards=records,
                          complete=complete)


@pytest.mark.parametrize("image_format", IMAGE_FORMATS)
def test_round_trip_through_webdataset(tmp_path, image_format):
    samples = _samples(6, channels=3)
    record = write_shard(tmp_path / "shard-000000.tar", samples, image_format)
    assert record.num_samples == 6
    got = [decode_sample(s) for s in wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False)]
    assert [s.key for s in got] == [s.key for s in samples]
    for a, b in zip(got, samples):
        assert a.label == b.label and a.meta == b.meta
        assert a.logits.dtype == np.float16 and np.array_equal(a.logits, b.logits)
        if image_format == "jpg":
            assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() < 3  # lossy
        else:
            assert np.array_equal(a.image, b.image)


def test_shard_bytes_are_deterministic(tmp_path):
    a = write_shard(tmp_path / "a.tar", _samples(5))
    b = write_shard(tmp_path / "b.tar", _samples(5))
    c = write_shard(tmp_path / "c.tar", _samples(5, seed=1))
    assert a.sha256 == b.sha256 != c.sha256
    names = tarfile.open(tmp_path / "a.tar").getnames()
    assert names[:4] == ["sample-00000000.png", "sample-00000000.cls", "sample-00000000.logits.npy",
                         "sample-00000000.json"]


def test_keys_with_dots_are_refused(tmp_path):
    bad = _samples(1)[0]
    bad.key = "a.b"
    with pytest.raises(ValueError, match="dots"):
        write_shard(tmp_path / "x.tar", [bad])
    assert not (tmp_path / "x.tar").exists() and not list(tmp_path.iterdir())  # temp file removed too


def test_manifest_round_trip_and_info_json(tmp_path):
    records = [write_shard(tmp_path / f"shard-00000{i}.tar", _samples(8, seed=i, first=8 * i)) for i in range(2)]
    write_manifest(tmp_path, _manifest(records))
    m = read_manifest(tmp_path)
    assert m.num_samples == 16 and m.shards == records and m.input_spec.size == 28
    info = json.loads((tmp_path / "_info.json").read_text())
    assert info["num_samples"] == 16 and info["shard_lengths"] == [8, 8]
    assert info["filenames"] == ["shard-000000.tar", "shard-000001.tar"]
    assert shard_paths(tmp_path, m)[0].endswith("shard-000000.tar")
    assert verify_dataset(tmp_path) == []


def test_the_selection_record_is_optional_and_checked(tmp_path):
    """`selection` (synth generate --select) is written only where there is one, so manifests without it keep
    their bytes and older ones read; where present its counts are checked like every other field."""
    records = [write_shard(tmp_path / "shard-000000.tar", _samples(8))]
    write_manifest(tmp_path, _manifest(records))
    assert "selection" not in json.loads((tmp_path / "manifest.json").read_text())
    assert read_manifest(tmp_path).selection is None
    manifest = _manifest(records)
    manifest.selection = {"select": "boundary", "candidates": 16, "selected": 8, "filled": 1,
                          "shards": {"shard-000000.tar": {"candidates": 16, "selected": 8, "filled": 1}}}
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path).selection == manifest.selection
    d = manifest.to_dict()
    d["selection"]["shards"]["shard-000000.tar"]["filled"] = -1
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match=r"selection.shards.shard-000000.tar.filled must be an integer >= 0"):
        read_manifest(tmp_path)


def test_the_held_out_split_is_found_by_one_helper(tmp_path):
    """read_held_out: the manifest of <folder>/val, finished or not; None without one or for a remote folder."""
    assert held_out_folder(tmp_path) == tmp_path / VAL_SPLIT
    assert read_held_out(tmp_path) is None
    val = tmp_path / VAL_SPLIT
    val.mkdir()
    assert read_held_out(tmp_path) is None   # a folder without a manifest (verify_dataset reports it)
    record = write_shard(val / "shard-000000.tar", _samples(8))
    write_manifest(val, _manifest([record], complete=False))
    assert read_held_out(tmp_path).complete is False
    write_manifest(val, _manifest([record]))
    held_out = read_held_out(tmp_path)
    assert held_out.complete and held_out.num_samples == 8
    assert read_held_out("http://127.0.0.1:9/shards") is None   # not probed over the network


def test_only_the_shard_contract_says_where_the_held_out_split_is():
    """synth verify, distill's --val-shards auto and verify_dataset find <folder>/val through read_held_out /
    held_out_folder; only the manifest module (and synth generate, which writes the split) joins VAL_SPLIT to a
    path."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    allowed = {"common/shards/manifest.py", "synth/generate.py"}
    joins = []
    for folder in ("common", "synth", "distill", "pipelines"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Name)
                        and node.right.id == "VAL_SPLIT"):
                    joins.append(f"{path.relative_to(root).as_posix()}:{node.lineno}")
    assert [j for j in joins if j.split(":")[0] not in allowed] == []


def test_verify_finds_truncated_and_missing_shards(tmp_path):
    records = [write_shard(tmp_path / f"shard-00000{i}.tar", _samples(8, seed=i, first=8 * i)) for i in range(3)]
    write_manifest(tmp_path, _manifest(records))
    data = (tmp_path / "shard-000001.tar").read_bytes()
    (tmp_path / "shard-000001.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "shard-000002.tar").unlink()
    problems = verify_dataset(tmp_path)
    assert any("shard-000001.tar" in p and "truncated" in p for p in problems)
    assert any("shard-000002.tar: missing" in p for p in problems)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(tmp_path)
    d = _manifest([]).to_dict()
    d["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="format version 99"):
        read_manifest(tmp_path)
    write_manifest(tmp_path, _manifest([], complete=False))
    with pytest.raises(UserError, match="unfinished"):
        read_manifest(tmp_path)


def _tar_with(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_pickle_and_unknown_fields_are_rejected(tmp_path):
    good = dict(write_shard_fields := {"__key__": "k", "cls": b"1"})
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    png = io.BytesIO()
    from PIL import Image
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png, format="PNG")
    with pytest.raises(ShardFormatError, match="plain .npy"):
        decode_sample({**good, "png": png.getvalue(), "logits.npy": buf.getvalue()})
    with pytest.raises(ShardFormatError, match="unexpected fields"):
        decode_sample({**write_shard_fields, "pyd": b"x"})
    (tmp_path / "bad.tar").write_bytes(_tar_with([("k.png", b"not an image"), ("k.cls", b"1")]))
    with pytest.raises(ShardFormatError):
        list(read_shard(tmp_path / "bad.tar"))


def test_truncation_at_any_block_is_detected(tmp_path):
    write_shard(tmp_path / "s.tar", _samples(3))
    data = (tmp_path / "s.tar").read_bytes()
    end = len(data.rstrip(b"\0"))  # last member's data ends here; its padding and the end marker follow
    for cut in (512, end - 1, end + 1, -(-end // 512) * 512):
        (tmp_path / "t.tar").write_bytes(data[:cut])
        with pytest.raises(ShardFormatError, match="truncated"):
            list(read_shard(tmp_path / "t.tar"))


def test_tar_header_checksum_is_exact_and_a_flipped_header_byte_is_refused(tmp_path):
    from dfkd.common.shards.tar import _byte_sum
    rng = np.random.default_rng(0)
    for block in [bytes(512), b"\xff" * 512, *(rng.integers(0, 256, 512, dtype=np.uint8).tobytes() for _ in range(200))]:
        assert _byte_sum(block) == sum(block)   # the Adler-32 shortcut never wraps on 512 bytes
    write_shard(tmp_path / "s.tar", _samples(3))
    data = bytearray((tmp_path / "s.tar").read_bytes())
    assert len(list(read_shard(tmp_path / "s.tar"))) == 3
    for offset in (0, 100, 124, 300, 511):       # name, mode, size, unused, last byte of the first header
        bad = bytearray(data)
        bad[offset] ^= 0x01
        (tmp_path / "t.tar").write_bytes(bytes(bad))
        with pytest.raises(ShardFormatError, match="checksum mismatch"):
            list(read_shard(tmp_path / "t.tar"))
