"""A shard's tar file: deterministic members (mtime 0, uid/gid 0, no user names, fixed order), written
atomically and hashed while written (`ShardFile`), and read back strictly (checksummed headers, allowed
member names and sizes) and fast (`iter_tar_members`)."""
from __future__ import annotations

import hashlib
import os
import re
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import numpy as np

from ..faults import fault_point
from ..fileio import atomic_open
from .codec import (MAX_IMAGE_PIXELS, MAX_MEMBER_BYTES, Sample, ShardFormatError, decode_sample, encode_images,
                    encode_sample)

# the members a sample may have, and the most bytes each may hold
FIELD_MAX_BYTES = {"png": MAX_MEMBER_BYTES, "jpg": MAX_MEMBER_BYTES, "npy": MAX_MEMBER_BYTES,
                   "cls": 32, "logits.npy": 4 << 20, "json": 64 << 10}
KEY_PATTERN = re.compile(r"sample-[0-9]{8,}")
_ZERO_BLOCK = bytes(512)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


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
