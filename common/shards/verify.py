"""Checks of a dataset folder against its manifest: every shard present, of its size and sha256, every
sample decodable and of the manifest's shape, keys unique; the held-out split; what is worth a warning."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fileio import is_temp_file, sha256_file
from ..remote import is_remote
from .codec import ShardFormatError
from .manifest import (INFO_NAME, MANIFEST_NAME, VAL_SPLIT, Manifest, held_out_folder, manifest_path, read_held_out,
                       read_manifest, shard_paths)
from .tar import ShardRecord, read_shard

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
    val = held_out_folder(folder)
    if not is_remote(folder) and val.is_dir() and not manifest_path(val).is_file():
        problems.append(f"{VAL_SPLIT}/: no {MANIFEST_NAME} (not a held-out split written by `synth generate`): "
                        "rerun the same `synth generate` or delete the folder")
    held_out = read_held_out(folder)
    if held_out is not None:
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
