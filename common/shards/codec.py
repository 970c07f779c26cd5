"""The samples of a shard and their members' bytes: images (PNG, JPEG, raw .npy), class, logits (.npy, read
without pickle) and metadata (JSON), each checked when decoded (sizes, decompression bombs, types)."""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from PIL import Image

IMAGE_FORMATS = ("png", "jpg", "npy")
LOSSY_FORMATS = ("jpg",)       # the stored logits are for the decoded image, not the pixels before encoding
# the image formats timm's `wds/` dataset reads: it decodes the jpg/png/webp member with PIL, and drops a
# sample without one (a raw .npy image) with a logged warning, so npy shards would read as empty there
TIMM_READABLE_FORMATS = ("png", "jpg")
MAX_IMAGE_PIXELS = 4096 * 4096  # refuse decompression bombs
MAX_MEMBER_BYTES = 64 << 20     # no legitimate sample field is this large
JPEG_QUALITY = 95
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG"}


class ShardFormatError(ValueError):
    """A sample or shard that does not follow the format."""


def sample_key(index: int) -> str:
    return f"sample-{index:08d}"


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


def encode_images(images: np.ndarray, image_format: str) -> tuple[list[bytes], np.ndarray | None]:
    """Encode a batch of uint8 (B, H, W, C) images. For a lossy format (JPEG) also return the pixels a
    reader decodes from those bytes, (B, H, W, C), which is what the teacher's stored logits must be for;
    None for the lossless ones (the decoded image is the image)."""
    encoded = [encode_image(image, image_format) for image in images]
    if image_format not in LOSSY_FORMATS:
        return encoded, None
    return encoded, np.stack([decode_image(data, image_format) for data in encoded])
