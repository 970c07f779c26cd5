"""The shard format: the one contract between stage one (synth) and stage two (distill).

A dataset folder holds
  shard-000000.tar, shard-000001.tar, ...   WebDataset tar shards
  manifest.json                             what made them and what they hold (below)
  _info.json                                timm's WebDataset split info (num_samples, filenames, shard_lengths);
                                            timm reads png and jpg shards, not npy ones (timm_readable in
                                            manifest.json and _info.json; no splits there for npy)
  val/                                      optional: a small held-out synthetic split, itself a complete dataset
                                            folder (shards, manifest.json, _info.json) of the same teacher and
                                            method, drawn with other seeds (no image in common with the training
                                            shards); its manifest's config is the training one plus
                                            "split": "val" and "val_images". `distill train --val-shards` measures
                                            the student's agreement with the teacher on it

Each sample in a shard is a group of tar members sharing a key (no dots in keys):
  sample-00001234.png | .jpg | .npy   the image, uint8 (H, W, C); PNG by default (lossless),
                                      JPEG (smaller, lossy) or a raw uint8 .npy array (fastest decode)
  sample-00001234.cls                 the target class, ASCII integer
  sample-00001234.logits.npy          the teacher's logits for exactly this stored image, float16 .npy
                                      (computed on the decoded images batched as a reader batches them)
  sample-00001234.json                small metadata (generator index, seed, resolution, ...)
No pickle anywhere: arrays are read with allow_pickle=False, JSON with json.loads.

Tar bytes are deterministic (fixed member order, mtime 0, uid/gid 0, no user names), so the same
samples always give the same shard bytes and the same sha256.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image

from . import schema
from .errors import UserError
from .faults import fault_point
from .fileio import atomic_open, canonical_json_sha256, is_temp_file, sha256_file, write_json_atomic
from .input_spec import InputSpec
from .remote import is_remote, read_bytes
from .remote import join as remote_join

FORMAT = "dfkd-webdataset"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INFO_NAME = "_info.json"
VAL_SPLIT = "val"              # the held-out split's folder inside a dataset folder
IMAGE_FORMATS = ("png", "jpg", "npy")
LOSSY_FORMATS = ("jpg",)       # the stored logits are for the decoded image, not the pixels before encoding
# the image formats timm's `wds/` dataset reads: it decodes the jpg/png/webp member with PIL, and drops a
# sample without one (a raw .npy image) with a logged warning, so npy shards would read as empty there
TIMM_READABLE_FORMATS = ("png", "jpg")
MAX_IMAGE_PIXELS = 4096 * 4096  # refuse decompression bombs
MAX_MEMBER_BYTES = 64 << 20     # no legitimate sample field is this large
MAX_MANIFEST_BYTES = 64 << 20
# the members a sample may have, and the most bytes each may hold
FIELD_MAX_BYTES = {"png": MAX_MEMBER_BYTES, "jpg": MAX_MEMBER_BYTES, "npy": MAX_MEMBER_BYTES,
                   "cls": 32, "logits.npy": 4 << 20, "json": 64 << 10}
KEY_PATTERN = re.compile(r"sample-[0-9]{8,}")
JPEG_QUALITY = 95
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG"}
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


_NPY_HEADERS: dict[bytes, tuple] = {}  # header bytes -> (dtype, shape, count): a shard repeats a few headers


def _npy_header(header: bytes) -> tuple | None:
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        match = _NPY_HEADER.fullmatch(header.decode("latin1"))
        if not match:
            return None
        shape = tuple(int(v) for v in match.group(2).split(",") if v.strip())
        parsed = (np.dtype(match.group(1)), shape, int(np.prod(shape)) if shape else 1)
        if len(_NPY_HEADERS) < 256:
            _NPY_HEADERS[header] = parsed
    return parsed


def _npy_load(data: bytes, what: str) -> np.ndarray:
    """Read a .npy array without pickle. The arrays this format writes (version 1.0 header, C order,
    float16/float32/uint8) take a fast path; anything else goes through np.load(allow_pickle=False)."""
    if data[:8] == b"\x93NUMPY\x01\x00" and len(data) >= 10:
        end = 10 + int.from_bytes(data[8:10], "little")
        parsed = _npy_header(data[10:end])
        if parsed:
            dtype, shape, count = parsed
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


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ShardFormatError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")


def decode_image(data: bytes, image_format: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image -> uint8 (H, W, C). Its size is checked from the header, before any pixel is decoded
    (decompression bombs); PNG and JPEG members must really be PNG and JPEG (no other PIL decoder runs)."""
    max_pixels = min(max_pixels, MAX_IMAGE_PIXELS)
    if image_format == "npy":
        image = _npy_load(data, "image")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
            raise ShardFormatError(f"image array must be uint8 (H, W, 1|3), got {image.dtype} {image.shape}")
        _check_pixels(image.shape[1], image.shape[0], max_pixels)
        return image
    try:
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[image_format]]) as pil:
            _check_pixels(pil.width, pil.height, max_pixels)
            if pil.mode not in ("L", "RGB"):
                pil = pil.convert("RGB")
            image = np.asarray(pil, dtype=np.uint8)
    except ShardFormatError:
        raise
    except Image.DecompressionBombError as e:
        raise ShardFormatError(f"image exceeds the limit of {max_pixels} pixels ({e})") from None
    except Exception as e:
        raise ShardFormatError(f"undecodable {image_format} image ({type(e).__name__}: {e})") from None
    return image[:, :, None] if image.ndim == 2 else image


def encode_sample(sample: Sample, image_format: str = "png", encoded_image: bytes | None = None
                  ) -> list[tuple[str, bytes]]:
    """A sample -> its tar members as (name, bytes), in a fixed order (`encoded_image`: the image's bytes
    when already encoded, e.g. by `encode_images`)."""
    if "." in sample.key or "/" in sample.key:
        raise ValueError(f"sample keys must not contain dots or slashes: {sample.key!r}")
    logits = np.asarray(sample.logits, dtype=np.float16)
    image = encode_image(sample.image, image_format) if encoded_image is None else encoded_image
    return [
        (f"{sample.key}.{image_format}", image),
        (f"{sample.key}.cls", str(int(sample.label)).encode()),
        (f"{sample.key}.logits.npy", _npy_bytes(logits)),
        (f"{sample.key}.json", json.dumps(sample.meta, sort_keys=True, separators=(",", ":")).encode()),
    ]


def decode_sample(fields: Mapping[str, bytes], max_pixels: int = MAX_IMAGE_PIXELS, with_meta: bool = True) -> Sample:
    """WebDataset's raw sample dict (`__key__`, `png`/`jpg`/`npy`, `cls`, `logits.npy`, `json`) -> Sample.
    An image of more than `max_pixels` pixels is refused before it is decoded. `with_meta=False` leaves
    the metadata unparsed (meta {}): training does not read it."""
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
        meta = json.loads(fields["json"]) if with_meta and "json" in fields else {}
    except (ValueError, RecursionError):
        raise ShardFormatError(f"sample {key}: metadata is not JSON") from None
    if not isinstance(meta, dict):
        raise ShardFormatError(f"sample {key}: metadata is not a JSON object")
    if not 0 <= label < logits.shape[0]:
        raise ShardFormatError(f"sample {key}: class {label} outside 0..{logits.shape[0] - 1}")
    try:
        image = decode_image(fields[image_fields[0]], image_fields[0], max_pixels)
    except ShardFormatError as e:
        raise ShardFormatError(f"sample {key}: {e}") from None
    return Sample(key=key, image=image, label=label, logits=logits, meta=meta)


# --------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class ShardRecord:
    name: str
    num_samples: int
    sha256: str
    size: int | None = None    # bytes; absent in manifests written before it was recorded


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member as `tarfile` writes it for this format: a USTAR header (mtime 0, mode 0444, uid/gid 0,
    no user names), the data, NUL padding to a 512-byte block."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape") + data + bytes(-len(data) % 512)


def encode_images(images: np.ndarray, image_format: str) -> tuple[list[bytes], np.ndarray | None]:
    """Encode a batch of uint8 (B, H, W, C) images. For a lossy format (JPEG) also return the pixels a
    reader decodes from those bytes, (B, H, W, C), which is what the teacher's stored logits must be for;
    None for the lossless ones (the decoded image is the image)."""
    encoded = [encode_image(image, image_format) for image in images]
    if image_format not in LOSSY_FORMATS:
        return encoded, None
    return encoded, np.stack([decode_image(data, image_format) for data in encoded])


def encode_segment(keys: list[str], images: np.ndarray | list[bytes], labels: list[int], logits: np.ndarray,
                   metas: list[dict], image_format: str) -> bytes:
    """The tar members of consecutive samples, concatenated (a shard is segments + `end_of_archive`).
    `images`: uint8 (B, H, W, C) pixels to encode, or their encoded bytes (from `encode_images`).
    Runs in `synth generate`'s writer processes: needs numpy and Pillow only."""
    if not isinstance(images, list):
        images = encode_images(images, image_format)[0]
    parts = []
    for key, image, label, row, meta in zip(keys, images, labels, logits, metas):
        for name, data in encode_sample(Sample(key, None, label, row, meta), image_format, image):
            parts.append(tar_member(name, data))
    return b"".join(parts)


def end_of_archive(size: int) -> bytes:
    """What `tarfile` writes on close after `size` bytes of members: two zero blocks, then zeros up to a
    multiple of its 10240-byte record."""
    size += 2 * 512
    return bytes(2 * 512 + (-size % tarfile.RECORDSIZE))


class ShardFile:
    """A shard being written from segments: atomic (temp name, fsync, rename on a clean exit), hashed while
    written (no second read), closed as `tarfile` closes an archive. `record` is set after the block. A
    failed write removes the temp file at once (a full disk is a DiskFullError naming the shard)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.count = self.size = 0
        self.record: ShardRecord | None = None
        self._hash = hashlib.sha256()
        self._atomic = None

    def __enter__(self) -> "ShardFile":
        self._atomic = atomic_open(self.path, "wb")
        self._file = self._atomic.__enter__()
        return self

    def write(self, segment: bytes, num_samples: int) -> None:
        self._put(segment)
        for _ in range(num_samples):
            self.count += 1
            fault_point("shard-sample")

    def _put(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except BaseException:
            self._abort(*sys.exc_info())
            raise
        self._hash.update(data)
        self.size += len(data)

    def _abort(self, *exc) -> None:
        """Remove the temp file; re-raises an OSError as what atomic_open makes of it (DiskFullError)."""
        atomic, self._atomic = self._atomic, None
        if atomic is not None:
            atomic.__exit__(*exc)

    def __exit__(self, *exc) -> bool:
        if self._atomic is None:   # already aborted by a failed write
            return False
        if exc[0] is not None:
            self._abort(*exc)
            return False
        self._put(end_of_archive(self.size))
        atomic, self._atomic = self._atomic, None
        atomic.__exit__(None, None, None)
        self.record = ShardRecord(self.path.name, self.count, self._hash.hexdigest(), self.size)
        return False


def write_shard(path: str | os.PathLike, samples: Iterable[Sample], image_format: str = "png") -> ShardRecord:
    """Write a complete shard atomically (temp name, fsync, rename). Same samples -> same bytes."""
    with ShardFile(path) as shard:
        for sample in samples:
            shard.write(b"".join(tar_member(name, data) for name, data in encode_sample(sample, image_format)), 1)
    return shard.record


def check_member(name: str, size: int) -> None:
    """A shard member must be named `<key>.<field>` (key sample-NNNNNNNN, a known field) and hold at most
    that field's FIELD_MAX_BYTES; ShardFormatError otherwise."""
    key, _, field_name = name.partition(".")
    if not KEY_PATTERN.fullmatch(key) or field_name not in FIELD_MAX_BYTES:
        raise ShardFormatError(f"unexpected member name {name!r} (expected sample-NNNNNNNN."
                               f"{{{','.join(FIELD_MAX_BYTES)}}})")
    if size > FIELD_MAX_BYTES[field_name]:
        raise ShardFormatError(f"member {name!r} is {size} bytes, over the {FIELD_MAX_BYTES[field_name]}-byte "
                               f"limit for .{field_name}")


def _any_member(name: str, size: int) -> None:
    if size > MAX_MEMBER_BYTES:
        raise ShardFormatError(f"member {name!r} is {size} bytes, over the limit")


def _byte_sum(block: bytes) -> int:
    """Exact sum of the bytes of a 512-byte tar header, in C: the low half of Adler-32 is 1 + the byte sum
    mod 65521, and a 256-byte half sums to at most 65280, so nothing wraps (6x faster than sum())."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2


def iter_tar_members(f: BinaryIO, source: str,
                     check: Callable[[str, int], None] = _any_member) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each member of a plain tar stream. Strict: regular files only, checksummed
    headers, `check(name, size)` before a member's data is read (size limits, allowed names);
    ShardFormatError (naming `source`) for anything else or a truncated file.
    Much faster than `tarfile` for the many small members of a shard (about 3 us per member)."""
    read = f.read
    while True:
        header = read(512)
        if header == _ZERO_BLOCK:
            return  # the end-of-archive marker every tar writer emits
        if len(header) < 512:
            raise ShardFormatError(f"{source}: truncated ({'no end-of-archive marker' if not header else 'incomplete tar header'})")
        stored = header[148:156].split(b"\0", 1)[0].strip()
        try:  # the checksum counts its own 8-byte field as spaces (8 x 32 = 256)
            valid = bool(stored) and int(stored, 8) == _byte_sum(header) - sum(header[148:156]) + 256
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            valid = False
        if not valid:
            raise ShardFormatError(f"{source}: corrupt tar header (checksum mismatch)")
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        if header[156:157] not in (b"0", b"\0"):
            raise ShardFormatError(f"{source}: member {name!r} is not a regular file")
        try:
            check(name, size)
        except ShardFormatError as e:
            raise ShardFormatError(f"{source}: {e}") from None
        padded = size + (-size % 512)
        data = read(padded)  # the member and its padding in one read
        if len(data) < padded:
            raise ShardFormatError(f"{source}: truncated inside member {name!r}")
        yield name, data[:size] if padded != size else data


def group_samples(f: BinaryIO, source: str, url: str) -> Iterator[dict]:
    """Raw sample dicts ({"__key__", "__url__", field: bytes}) of a shard's tar stream, as WebDataset groups
    them. Members of one sample must be adjacent; names and sizes must pass `check_member`."""
    group: dict = {}
    for name, data in iter_tar_members(f, source, check_member):
        key, _, field_name = name.partition(".")
        if group and key != group["__key__"]:
            yield group
            group = {}
        if field_name in group:
            raise ShardFormatError(f"{source}: duplicate member {name!r}")
        group.setdefault("__key__", key)
        group.setdefault("__url__", url)
        group[field_name] = data
    if group:
        yield group


def iter_raw_samples(path: str | os.PathLike) -> Iterator[dict]:
    """Raw sample dicts of one shard file (`group_samples`)."""
    with open(path, "rb", buffering=1 << 20) as f:
        yield from group_samples(f, Path(path).name, str(path))


def read_shard(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[Sample]:
    """Decoded samples of one shard (ShardFormatError for anything that breaks the format)."""
    for fields in iter_raw_samples(path):
        try:
            yield decode_sample(fields, max_pixels)
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
    recipe: dict | None = None     # the recipe applied: name, path, sha256, reason, measured_on (not hashed)
    options: dict | None = None    # every option as resolved (stage one's config and method config)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def teacher_record(self) -> TeacherRecord:
        return TeacherRecord.from_dict(self.teacher)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.teacher["input_spec"])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_samples"] = self.num_samples
        d["timm_readable"] = self.image_format in TIMM_READABLE_FORMATS  # informative; not read back
        d["shards"] = [{k: v for k, v in s.items() if v is not None} for s in d["shards"]]
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}

    @classmethod
    def from_dict(cls, d: dict, source: str = "manifest") -> "Manifest":
        """Parse a manifest read from a file, checked against the schema (`validate_manifest`)."""
        fix = "regenerate the shards or restore the original manifest.json"
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserError(f"{source} is not a {FORMAT} manifest; {fix}")
        if d.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{source} has format version {d.get('format_version')!r}; this tool reads version "
                            f"{FORMAT_VERSION}: regenerate the shards or use a matching release")
        try:
            return validate_manifest(d)
        except schema.SchemaError as e:
            raise UserError(f"{source} does not follow the manifest schema: {e}; {fix}") from None


@dataclass
class TeacherRecord:
    """The teacher a dataset was made with, as `manifest.json` records it (`Manifest.teacher`)."""

    arch: str
    weights: str                     # what was asked for: DEFAULT, a weights name, a path, or none
    weights_path: str | None         # the resolved checkpoint file, when `weights` is one
    weights_sha256: str              # sha256 of the state dict (common.models.state_dict_sha256)
    input_spec: dict                 # InputSpec.to_dict()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherRecord":
        return cls(str(d["arch"]), str(d["weights"]), d.get("weights_path"), str(d["weights_sha256"]),
                   dict(d["input_spec"]))


def build_manifest(teacher: TeacherRecord, *, method: str, config: dict, image_format: str, planned_samples: int,
                   shard_size: int, shards: Iterable[ShardRecord] = (), complete: bool = False,
                   recipe: dict | None = None, options: dict | None = None) -> Manifest:
    """The one way to make a manifest (`synth generate`, the pipelines' real-data shards, tests): the
    class count comes from the teacher's input spec, `config_sha256` from `config` (canonical JSON)."""
    return Manifest(teacher=teacher.to_dict(), num_classes=int(teacher.input_spec["num_classes"]),
                    image_format=image_format, method=method, config=config,
                    config_sha256=canonical_json_sha256(config), planned_samples=planned_samples,
                    shard_size=shard_size, shards=list(shards), complete=complete, recipe=recipe, options=options)


def validate_manifest(d: dict) -> Manifest:
    """A Manifest from its JSON form, every field checked for presence, type and range (SchemaError).
    Unknown fields are ignored (later versions of format 1 may add some)."""
    teacher = schema.obj(d, "teacher")
    spec_dict = schema.obj(teacher, "input_spec", "teacher")
    channels = schema.integer(spec_dict, "channels", "teacher.input_spec", minimum=1)
    schema.integer(spec_dict, "size", "teacher.input_spec", minimum=1)
    schema.numbers(spec_dict, "mean", "teacher.input_spec", length=channels)
    schema.numbers(spec_dict, "std", "teacher.input_spec", length=channels, positive=True)
    spec_classes = schema.integer(spec_dict, "num_classes", "teacher.input_spec", minimum=1)
    for key in ("arch", "weights"):
        schema.string(teacher, key, "teacher")
    schema.optional_string(teacher, "weights_path", "teacher")
    schema.sha256(teacher, "weights_sha256", "teacher")
    num_classes = schema.integer(d, "num_classes", minimum=1)
    if num_classes != spec_classes:
        raise schema.SchemaError(f"num_classes is {num_classes} but teacher.input_spec.num_classes is {spec_classes}")
    image_format = schema.string(d, "image_format", pattern=re.compile("|".join(IMAGE_FORMATS)),
                                 what=f"one of {', '.join(IMAGE_FORMATS)}")
    shards = [_shard_record(s, f"shards[{i}]") for i, s in enumerate(schema.array(d, "shards"))]
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise schema.SchemaError(f"shards lists {next(n for n in names if names.count(n) > 1)} twice")
    manifest = Manifest(teacher=teacher, num_classes=num_classes, image_format=image_format,
                        method=schema.string(d, "method"), config=schema.obj(d, "config"),
                        config_sha256=schema.sha256(d, "config_sha256"),
                        planned_samples=schema.integer(d, "planned_samples"),
                        shard_size=schema.integer(d, "shard_size", minimum=1), shards=shards,
                        complete=schema.boolean(d, "complete"),
                        recipe=schema.obj(d, "recipe") if d.get("recipe") is not None else None,
                        options=schema.obj(d, "options") if d.get("options") is not None else None)
    if manifest.complete and manifest.num_samples != manifest.planned_samples:
        raise schema.SchemaError(f"it is marked complete but its shards hold {manifest.num_samples} samples, "
                                 f"not the planned {manifest.planned_samples}")
    return manifest


_SHARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\.tar")


def _shard_record(d: dict, where: str) -> ShardRecord:
    name = schema.string(d, "name", where, _SHARD_NAME, "a plain file name ending in .tar (no folders)")
    size = schema.integer(d, "size", where) if isinstance(d, dict) and "size" in d else None
    return ShardRecord(name, schema.integer(d, "num_samples", where), schema.sha256(d, "sha256", where), size)


def manifest_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / MANIFEST_NAME


def read_manifest(folder: str | os.PathLike, require_complete: bool = True) -> Manifest:
    """The manifest of a shard folder: a local path, or a URL / `pipe:` command (common.remote)."""
    if is_remote(folder):
        return read_remote_manifest(str(folder), require_complete)
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"shards folder {folder} does not exist; run `synth generate --out {folder}` first")
    path = manifest_path(folder)
    if not path.is_file():
        raise UserError(f"{folder} has no {MANIFEST_NAME}: not a synth output folder "
                        f"(run `synth generate --out {folder}`)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise UserError(f"{path} is {path.stat().st_size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit for a "
                        "manifest; regenerate the shards or restore the original manifest.json")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:100]}); regenerate the shards "
                        "or restore the original manifest.json") from None
    manifest = Manifest.from_dict(data, str(path))
    if require_complete and not manifest.complete:
        raise UserError(f"{folder} is unfinished ({len(manifest.shards)} shards of "
                        f"{manifest.planned_samples} samples written): rerun the same `synth generate` to finish it")
    if require_complete and not manifest.shards:
        raise UserError(f"{folder} holds no shards; regenerate with --num-images > 0")
    return manifest


def read_remote_manifest(location: str, require_complete: bool = True) -> Manifest:
    """read_manifest for a remote shard folder (same checks, read through webdataset's gopen)."""
    url = remote_join(location, MANIFEST_NAME)
    data = read_bytes(url, MAX_MANIFEST_BYTES, "the manifest")
    try:
        manifest = Manifest.from_dict(json.loads(data), url)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{url} is not valid JSON ({type(e).__name__}: {str(e)[:100]}); is it a synth output "
                        "folder?") from None
    if require_complete and not manifest.complete:
        raise UserError(f"{location} is unfinished ({len(manifest.shards)} shards written): finish it with "
                        "`synth generate` and upload it again")
    if require_complete and not manifest.shards:
        raise UserError(f"{location} holds no shards")
    return manifest


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> None:
    """Write manifest.json atomically; for a complete dataset also timm's _info.json."""
    folder = Path(folder)
    write_json_atomic(manifest_path(folder), manifest.to_dict())
    if manifest.complete:
        write_json_atomic(folder / INFO_NAME, info_json(folder.name, manifest))


def info_json(name: str, manifest: Manifest) -> dict:
    """timm's WebDataset split info for a complete dataset. For a format timm cannot decode (npy) it has no
    `splits`, so that timm stops with "split train not found" instead of reading 0 of N samples; its
    `timm_readable` and `note` say why."""
    names, lengths = [s.name for s in manifest.shards], [s.num_samples for s in manifest.shards]
    info = {"name": name, "image_format": manifest.image_format,
            "timm_readable": manifest.image_format in TIMM_READABLE_FORMATS}
    if info["timm_readable"]:
        info["splits"] = {"train": {"name": "train", "num_samples": manifest.num_samples, "filenames": names,
                                    "shard_lengths": lengths}}
    else:
        info["note"] = (f"images are .{manifest.image_format} members, which timm's wds/ dataset cannot decode "
                        f"(it reads {', '.join(TIMM_READABLE_FORMATS)} and webp with PIL); regenerate with "
                        "`synth generate --image-format png` (or jpg) to train with timm")
    return info | {"num_samples": manifest.num_samples, "filenames": names, "shard_lengths": lengths}


def shard_paths(folder: str | os.PathLike, manifest: Manifest) -> list[str]:
    if is_remote(folder):
        return [remote_join(str(folder), s.name) for s in manifest.shards]
    folder = Path(folder).resolve()
    return [str(folder / s.name) for s in manifest.shards]


CHECK_LEVELS = ("full", "size", "none")


def check_shard_file(path: str | os.PathLike, record: ShardRecord, level: str = "full") -> str | None:
    """What is wrong with one shard file against its manifest record, or None. Levels: `size` checks
    presence and byte count (when the manifest records it), `full` also the sha256, `none` nothing."""
    if level == "none":
        return None
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing"
    if not os.path.isfile(path):
        return "not a regular file"
    if record.size is not None and size != record.size:
        return f"{size} bytes, the manifest says {record.size} (truncated or modified)"
    if level == "full" and sha256_file(path) != record.sha256:
        return "sha256 differs from the manifest (modified or damaged)"
    return None


def check_shard_files(folder: str | os.PathLike, manifest: Manifest, level: str = "full",
                      jobs: int | None = None) -> dict[str, str]:
    """{shard name: problem} for every listed shard whose file does not match the manifest (several
    files hashed at once: hashlib releases the GIL). Remote shards are not checked here: the loader
    checks each one while it streams (common.remote.fetch_verified)."""
    if level not in CHECK_LEVELS:
        raise UserError(f"shard check level must be one of {', '.join(CHECK_LEVELS)}, not {level!r}")
    if is_remote(folder):
        return {}
    jobs = jobs or min(8, os.cpu_count() or 1)
    pairs = list(zip(shard_paths(folder, manifest), manifest.shards))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        found = list(pool.map(lambda pair: check_shard_file(pair[0], pair[1], level), pairs))
    return {record.name: problem for (_, record), problem in zip(pairs, found) if problem}


@dataclass
class ShardContent:
    """What decoding a whole shard found: its sample keys and what is wrong with its samples."""

    keys: list[str]
    problems: list[str]


def check_shard_content(path: str | os.PathLike, record: ShardRecord, manifest: Manifest) -> ShardContent:
    """Decode every sample of a shard and check it against the manifest: image shape, logits length,
    finite logits, sample count. Stops at the first sample that breaks the format."""
    spec = manifest.input_spec
    expected = (spec.size, spec.size, spec.channels)
    keys, problems = [], []
    try:
        for sample in read_shard(path, max_pixels=spec.size * spec.size):
            keys.append(sample.key)
            if sample.image.shape != expected:
                problems.append(f"sample {sample.key}: image {sample.image.shape}, the manifest says {expected}")
            elif sample.logits.shape != (manifest.num_classes,):
                problems.append(f"sample {sample.key}: {sample.logits.shape[0]} logits, the manifest says "
                                f"{manifest.num_classes} classes")
            elif not np.isfinite(sample.logits).all():
                problems.append(f"sample {sample.key}: logits are not finite")
    except ShardFormatError as e:
        problems.append(str(e).removeprefix(f"{Path(path).name}: "))
    else:
        if len(keys) != record.num_samples:
            problems.append(f"holds {len(keys)} samples, the manifest says {record.num_samples}")
    if len(problems) > 3:
        problems = problems[:3] + [f"... and {len(problems) - 3} more problems"]
    return ShardContent(keys, problems)


def verify_dataset(folder: str | os.PathLike, decode: bool = True, jobs: int | None = None) -> list[str]:
    """Check every shard against the manifest: present, byte size, sha256, and (decode) every sample
    decodable and of the manifest's shape, the sample count, keys unique across shards; and so the
    held-out split in `folder`/val when there is one (its problems start with val/, and it must be of the
    same teacher). Returns the problems, each starting with the shard's name."""
    manifest = read_manifest(folder, require_complete=False)
    problems = _verify_one(folder, manifest, decode, jobs)
    val = Path(folder) / VAL_SPLIT
    if not is_remote(folder) and val.is_dir():
        if not manifest_path(val).is_file():
            problems.append(f"{VAL_SPLIT}/: no {MANIFEST_NAME} (not a held-out split written by `synth generate`): "
                            "rerun the same `synth generate` or delete the folder")
        else:
            held_out = read_manifest(val, require_complete=False)
            mismatch = held_out_mismatch(manifest, held_out)
            if mismatch:
                problems.append(f"{VAL_SPLIT}/{MANIFEST_NAME}: {mismatch}")
            problems += [f"{VAL_SPLIT}/{p}" for p in _verify_one(val, held_out, decode, jobs)]
    return sorted(problems)


def held_out_mismatch(train: Manifest, held_out: Manifest) -> str | None:
    """Why `held_out` cannot validate a student of `train`'s teacher (another class count, input or teacher),
    or None."""
    if held_out.num_classes != train.num_classes:
        return f"it has {held_out.num_classes} classes, the training shards {train.num_classes}"
    spec, other = held_out.input_spec, train.input_spec
    if (spec.channels, spec.size) != (other.channels, other.size):
        return (f"its images are {spec.channels} x {spec.size} px, the training shards' "
                f"{other.channels} x {other.size} px")
    if held_out.teacher.get("weights_sha256") != train.teacher.get("weights_sha256"):
        return "it was labelled by another teacher (weights sha256) than the training shards"
    return None


def _verify_one(folder: str | os.PathLike, manifest: Manifest, decode: bool, jobs: int | None) -> list[str]:
    bad_files = check_shard_files(folder, manifest, "full", jobs)
    problems = [f"{name}: {problem}" for name, problem in bad_files.items()]
    if decode:
        good = [(path, record) for path, record in zip(shard_paths(folder, manifest), manifest.shards)
                if record.name not in bad_files]
        with ThreadPoolExecutor(max_workers=jobs or min(4, os.cpu_count() or 1)) as pool:
            contents = list(pool.map(lambda pair: check_shard_content(pair[0], pair[1], manifest), good))
        seen: dict[str, str] = {}
        for (_, record), content in zip(good, contents):
            problems += [f"{record.name}: {p}" for p in content.problems]
            duplicates = [k for k in content.keys if k in seen]
            if duplicates:
                problems.append(f"{record.name}: {len(duplicates)} sample keys also in {seen[duplicates[0]]} "
                                f"(first: {duplicates[0]}): a shard copied under two names?")
            seen.update((k, record.name) for k in content.keys)
    if not manifest.complete:
        problems.append(f"{MANIFEST_NAME}: marks the dataset unfinished: rerun the same `synth generate`")
    return problems


def dataset_warnings(folder: str | os.PathLike) -> list[str]:
    """Things in a dataset folder that are not wrong but worth knowing: files that look like shards but
    are not listed in the manifest (ignored by readers), temp files of interrupted writes, a missing or
    stale _info.json."""
    folder = Path(folder)
    manifest = read_manifest(folder, require_complete=False)
    listed = {s.name for s in manifest.shards}
    notes = []
    for p in sorted(folder.iterdir()):
        if is_temp_file(p):
            notes.append(f"{p.name}: temp file of an interrupted write; rerun `synth generate` (it removes it) "
                         "or delete it")
        elif p.suffix == ".tar" and p.name not in listed:
            notes.append(f"{p.name}: not listed in {MANIFEST_NAME}, so readers ignore it")
    if manifest.complete:
        try:
            info = json.loads((folder / INFO_NAME).read_text())
            stale = info.get("filenames") != [s.name for s in manifest.shards]
        except (OSError, ValueError, AttributeError):
            stale = True
        if stale:
            notes.append(f"{INFO_NAME}: missing or out of date (only timm reads it); rerun `synth generate` to "
                         "rewrite it")
    return notes
