"""The shard format: the one contract between stage one (synth) and stage two (distill).

A dataset folder holds
  shard-000000.tar, shard-000001.tar, ...   WebDataset tar shards
  manifest.json                             what made them and what they hold (below)
  _info.json                                timm's WebDataset split info (num_samples, filenames, shard_lengths)

Each sample in a shard is a group of tar members sharing a key (no dots in keys):
  sample-00001234.png | .jpg | .npy   the image, uint8 (H, W, C); PNG by default (lossless),
                                      JPEG (smaller, lossy) or a raw uint8 .npy array (fastest decode)
  sample-00001234.cls                 the target class, ASCII integer
  sample-00001234.logits.npy          the teacher's logits for exactly this stored image, float16 .npy
  sample-00001234.json                small metadata (generator index, seed, resolution, ...)
No pickle anywhere: arrays are read with allow_pickle=False, JSON with json.loads.

Tar bytes are deterministic (fixed member order, mtime 0, uid/gid 0, no user names), so the same
samples always give the same shard bytes and the same sha256.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image

from .errors import UserError
from .fileio import atomic_open, sha256_file, write_json_atomic
from .models import InputSpec

FORMAT = "dfkd-webdataset"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INFO_NAME = "_info.json"
IMAGE_FORMATS = ("png", "jpg", "npy")
MAX_IMAGE_PIXELS = 4096 * 4096  # refuse decompression bombs
MAX_MEMBER_BYTES = 64 << 20     # no legitimate sample field is this large
JPEG_QUALITY = 95
_ZERO_BLOCK = bytes(512)


class ShardFormatError(ValueError):
    """A sample or shard that does not follow the format."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    return f"sample-{index:08d}"


# --------------------------------------------------------------------------- samples
@dataclass
class Sample:
    key: str
    image: np.ndarray          # uint8 (H, W, C)
    label: int
    logits: np.ndarray         # float16 (num_classes,)
    meta: dict = field(default_factory=dict)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


_NPY_HEADER = re.compile(r"\{'descr': '(<f2|<f4|\|u1)', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \} *\n")


def _npy_load(data: bytes, what: str) -> np.ndarray:
    """Read a .npy array without pickle. The arrays this format writes (version 1.0 header, C order,
    float16/float32/uint8) take a fast path; anything else goes through np.load(allow_pickle=False)."""
    if data[:8] == b"\x93NUMPY\x01\x00" and len(data) >= 10:
        end = 10 + int.from_bytes(data[8:10], "little")
        match = _NPY_HEADER.fullmatch(data[10:end].decode("latin1"))
        if match:
            dtype = np.dtype(match.group(1))
            shape = tuple(int(v) for v in match.group(2).split(",") if v.strip())
            count = int(np.prod(shape)) if shape else 1
            if len(data) - end == count * dtype.itemsize:
                return np.frombuffer(data, dtype=dtype, count=count, offset=end).reshape(shape)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise ShardFormatError(f"{what}: not a plain .npy array ({e})") from None


def encode_image(image: np.ndarray, image_format: str) -> bytes:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"images must be uint8 (H, W, 1|3), got {image.dtype} {image.shape}")
    if image_format == "npy":
        return _npy_bytes(np.ascontiguousarray(image))
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    buf = io.BytesIO()
    if image_format == "png":
        pil.save(buf, format="PNG", compress_level=6)
    elif image_format == "jpg":
        pil.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, not {image_format!r}")
    return buf.getvalue()


def decode_image(data: bytes, image_format: str) -> np.ndarray:
    if image_format == "npy":
        image = _npy_load(data, "image")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
            raise ShardFormatError(f"image array must be uint8 (H, W, 1|3), got {image.dtype} {image.shape}")
        if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
            raise ShardFormatError(f"image of {image.shape[0]}x{image.shape[1]} exceeds the pixel limit")
        return image
    try:
        with Image.open(io.BytesIO(data)) as pil:
            if pil.width * pil.height > MAX_IMAGE_PIXELS:
                raise ShardFormatError(f"image of {pil.width}x{pil.height} exceeds the pixel limit")
            if pil.mode not in ("L", "RGB"):
                pil = pil.convert("RGB")
            image = np.asarray(pil, dtype=np.uint8)
    except ShardFormatError:
        raise
    except Exception as e:
        raise ShardFormatError(f"undecodable {image_format} image ({e})") from None
    return image[:, :, None] if image.ndim == 2 else image


def encode_sample(sample: Sample, image_format: str = "png") -> list[tuple[str, bytes]]:
    """A sample -> its tar members as (name, bytes), in a fixed order."""
    if "." in sample.key or "/" in sample.key:
        raise ValueError(f"sample keys must not contain dots or slashes: {sample.key!r}")
    logits = np.asarray(sample.logits, dtype=np.float16)
    return [
        (f"{sample.key}.{image_format}", encode_image(sample.image, image_format)),
        (f"{sample.key}.cls", str(int(sample.label)).encode()),
        (f"{sample.key}.logits.npy", _npy_bytes(logits)),
        (f"{sample.key}.json", json.dumps(sample.meta, sort_keys=True, separators=(",", ":")).encode()),
    ]


def decode_sample(fields: Mapping[str, bytes]) -> Sample:
    """WebDataset's raw sample dict (`__key__`, `png`/`jpg`/`npy`, `cls`, `logits.npy`, `json`) -> Sample."""
    key = fields.get("__key__", "?")
    known = {"__key__", "__url__", "__local_path__", "cls", "logits.npy", "json", *IMAGE_FORMATS}
    unknown = set(fields) - known
    if unknown:
        raise ShardFormatError(f"sample {key}: unexpected fields {sorted(unknown)}")
    image_fields = [f for f in IMAGE_FORMATS if f in fields]
    missing = [f for f in ("cls", "logits.npy") if f not in fields] + ([] if image_fields else ["image"])
    if missing or len(image_fields) > 1:
        raise ShardFormatError(f"sample {key}: missing fields {missing} or several images {image_fields}")
    try:
        label = int(fields["cls"].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ShardFormatError(f"sample {key}: class is not an ASCII integer") from None
    logits = _npy_load(fields["logits.npy"], f"sample {key} logits")
    if logits.ndim != 1 or logits.dtype.kind != "f":
        raise ShardFormatError(f"sample {key}: logits must be a 1-d float array, got {logits.dtype} {logits.shape}")
    try:
        meta = json.loads(fields["json"]) if "json" in fields else {}
    except ValueError:
        raise ShardFormatError(f"sample {key}: metadata is not JSON") from None
    if not 0 <= label < logits.shape[0]:
        raise ShardFormatError(f"sample {key}: class {label} outside 0..{logits.shape[0] - 1}")
    try:
        image = decode_image(fields[image_fields[0]], image_fields[0])
    except ShardFormatError as e:
        raise ShardFormatError(f"sample {key}: {e}") from None
    return Sample(key=key, image=image, label=label, logits=logits, meta=meta)


# --------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class ShardRecord:
    name: str
    num_samples: int
    sha256: str


def write_shard(path: str | os.PathLike, samples: Iterable[Sample], image_format: str = "png") -> ShardRecord:
    """Write a complete shard atomically (temp name, fsync, rename). Same samples -> same bytes."""
    path = Path(path)
    count = 0
    with atomic_open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                for name, data in encode_sample(sample, image_format):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o444
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
                count += 1
    return ShardRecord(path.name, count, sha256_file(path))


def iter_tar_members(f: BinaryIO, source: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each member of a plain tar stream. Strict: regular files only, checksummed
    headers, size limits; ShardFormatError (naming `source`) for anything else or a truncated file.
    Much faster than `tarfile` for the many small members of a shard."""
    while True:
        header = f.read(512)
        if header == _ZERO_BLOCK:
            return  # the end-of-archive marker every tar writer emits
        if len(header) < 512:
            raise ShardFormatError(f"{source}: truncated ({'no end-of-archive marker' if not header else 'incomplete tar header'})")
        stored = header[148:156].split(b"\0", 1)[0].strip()
        if not stored or int(stored, 8) != sum(header[:148]) + 256 + sum(header[156:]):
            raise ShardFormatError(f"{source}: corrupt tar header (checksum mismatch)")
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
        if prefix:
            name = prefix.decode("utf-8", "replace") + "/" + name
        if header[156:157] not in (b"0", b"\0"):
            raise ShardFormatError(f"{source}: member {name!r} is not a regular file")
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        if size > MAX_MEMBER_BYTES:
            raise ShardFormatError(f"{source}: member {name!r} is {size} bytes, over the limit")
        data = f.read(size)
        padding = -size % 512
        if len(data) < size or len(f.read(padding)) < padding:
            raise ShardFormatError(f"{source}: truncated inside member {name!r}")
        yield name, data


def iter_raw_samples(path: str | os.PathLike) -> Iterator[dict]:
    """Raw sample dicts ({"__key__", "__url__", field: bytes}) of one shard, as WebDataset groups them.
    Members of one sample must be adjacent; names must be `<key>.<field>` without folders."""
    source = Path(path).name
    group: dict = {}
    with open(path, "rb", buffering=1 << 20) as f:
        for name, data in iter_tar_members(f, source):
            key, _, field_name = name.partition(".")
            if "/" in name or not key or not field_name:
                raise ShardFormatError(f"{source}: unexpected member name {name!r}")
            if group and key != group["__key__"]:
                yield group
                group = {}
            if field_name in group:
                raise ShardFormatError(f"{source}: duplicate member {name!r}")
            group.setdefault("__key__", key)
            group.setdefault("__url__", str(path))
            group[field_name] = data
    if group:
        yield group


def read_shard(path: str | os.PathLike) -> Iterator[Sample]:
    """Decoded samples of one shard (ShardFormatError for anything that breaks the format)."""
    for fields in iter_raw_samples(path):
        try:
            yield decode_sample(fields)
        except ShardFormatError as e:
            raise ShardFormatError(f"{Path(path).name}: {e}") from None


# --------------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    """What a dataset folder holds. `complete` is false while `synth generate` is still writing it."""

    teacher: dict              # arch, weights, weights_path, weights_sha256, input_spec
    num_classes: int
    image_format: str
    method: str
    config: dict               # the method's full config plus the generation options
    config_sha256: str
    planned_samples: int
    shard_size: int
    shards: list[ShardRecord] = field(default_factory=list)
    complete: bool = False
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.teacher["input_spec"])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_samples"] = self.num_samples
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: dict, source: str = "manifest") -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserError(f"{source} is not a {FORMAT} manifest")
        if d.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{source} has format version {d.get('format_version')}; this tool reads version "
                            f"{FORMAT_VERSION}: regenerate the shards or use a matching release")
        try:
            shards = [ShardRecord(str(s["name"]), int(s["num_samples"]), str(s["sha256"])) for s in d["shards"]]
            m = cls(teacher=dict(d["teacher"]), num_classes=int(d["num_classes"]),
                    image_format=str(d["image_format"]), method=str(d["method"]), config=dict(d["config"]),
                    config_sha256=str(d["config_sha256"]), planned_samples=int(d["planned_samples"]),
                    shard_size=int(d["shard_size"]), shards=shards, complete=bool(d["complete"]))
            for k in ("arch", "weights", "weights_sha256", "input_spec"):
                m.teacher[k]  # noqa: B018 (presence check)
            spec = m.input_spec
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source} is malformed ({type(e).__name__}: {e}); regenerate the shards") from None
        if m.image_format not in IMAGE_FORMATS:
            raise UserError(f"{source}: unknown image format {m.image_format!r}")
        if spec.num_classes != m.num_classes:
            raise UserError(f"{source}: teacher has {spec.num_classes} classes but the manifest says {m.num_classes}")
        for s in shards:
            if Path(s.name).name != s.name or not s.name.endswith(".tar"):
                raise UserError(f"{source}: shard name {s.name!r} is not a plain .tar file name")
        return m


def manifest_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / MANIFEST_NAME


def read_manifest(folder: str | os.PathLike, require_complete: bool = True) -> Manifest:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"shards folder {folder} does not exist; run `synth generate --out {folder}` first")
    path = manifest_path(folder)
    if not path.is_file():
        raise UserError(f"{folder} has no {MANIFEST_NAME}: not a synth output folder "
                        f"(run `synth generate --out {folder}`)")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); regenerate the shards") from None
    manifest = Manifest.from_dict(data, str(path))
    if require_complete and not manifest.complete:
        raise UserError(f"{folder} is unfinished ({len(manifest.shards)} shards of "
                        f"{manifest.planned_samples} samples written): rerun the same `synth generate` to finish it")
    if require_complete and not manifest.shards:
        raise UserError(f"{folder} holds no shards; regenerate with --num-images > 0")
    return manifest


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> None:
    """Write manifest.json atomically; for a complete dataset also timm's _info.json."""
    folder = Path(folder)
    write_json_atomic(manifest_path(folder), manifest.to_dict())
    if manifest.complete:
        write_json_atomic(folder / INFO_NAME, {
            "name": folder.name,
            "splits": {"train": {"name": "train", "num_samples": manifest.num_samples,
                                 "filenames": [s.name for s in manifest.shards],
                                 "shard_lengths": [s.num_samples for s in manifest.shards]}},
            "num_samples": manifest.num_samples,
            "filenames": [s.name for s in manifest.shards],
            "shard_lengths": [s.num_samples for s in manifest.shards],
        })


def shard_paths(folder: str | os.PathLike, manifest: Manifest) -> list[str]:
    folder = Path(folder).resolve()
    return [str(folder / s.name) for s in manifest.shards]


def verify_dataset(folder: str | os.PathLike, decode: bool = True) -> list[str]:
    """Check every shard against the manifest (present, sha256, sample count, decodable). Returns problems."""
    manifest = read_manifest(folder, require_complete=False)
    problems = []
    for record, path in zip(manifest.shards, shard_paths(folder, manifest)):
        if not os.path.isfile(path):
            problems.append(f"{record.name}: missing")
            continue
        if sha256_file(path) != record.sha256:
            problems.append(f"{record.name}: sha256 differs from the manifest (modified or truncated)")
            continue
        if decode:
            try:
                n = sum(1 for s in read_shard(path) if s.logits.shape[0] == manifest.num_classes)
            except ShardFormatError as e:
                problems.append(f"{record.name}: {e}")
                continue
            if n != record.num_samples:
                problems.append(f"{record.name}: {n} valid samples, manifest says {record.num_samples}")
    if not manifest.complete:
        problems.append("manifest marks the dataset unfinished: rerun the same `synth generate`")
    return problems
