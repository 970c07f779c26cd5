"""A dataset folder's manifest.json (what made the shards and what they hold, checked against its schema
when read) and timm's _info.json; the folder's layout (the held-out split, the shards' paths, local or
remote)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import UserError
from ..fileio import canonical_json_sha256, write_json_atomic
from ..input_spec import InputSpec
from ..remote import is_remote, read_bytes
from ..remote import join as remote_join
from . import schema
from .codec import IMAGE_FORMATS, TIMM_READABLE_FORMATS
from .tar import ShardRecord

FORMAT = "dfkd-webdataset"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INFO_NAME = "_info.json"
VAL_SPLIT = "val"              # the held-out split's folder inside a dataset folder
MAX_MANIFEST_BYTES = 64 << 20


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
    # what `synth generate --select` did (select, candidates, selected, filled, per-shard counts); None: no selection
    selection: dict | None = None
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
        if d["selection"] is None:   # only where there is one: manifests without selection stay as they were
            del d["selection"]
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
    source: str | None = None        # where weights without a recorded spec came from (the CIFAR bundle's files)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["source"] is None:   # only where there is one: manifests of other teachers stay as they were
            del d["source"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TeacherRecord":
        return cls(str(d["arch"]), str(d["weights"]), d.get("weights_path"), str(d["weights_sha256"]),
                   dict(d["input_spec"]), d.get("source"))


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
                        options=schema.obj(d, "options") if d.get("options") is not None else None,
                        selection=_selection(d) if d.get("selection") is not None else None)
    if manifest.complete and manifest.num_samples != manifest.planned_samples:
        raise schema.SchemaError(f"it is marked complete but its shards hold {manifest.num_samples} samples, "
                                 f"not the planned {manifest.planned_samples}")
    return manifest


_SELECTION_COUNTS = ("candidates", "selected", "filled")


def _selection(d: dict) -> dict:
    """The optional `selection` record (`synth generate --select`): the mode, the totals and per-shard counts."""
    selection = schema.obj(d, "selection")
    schema.string(selection, "select", "selection")
    for key in _SELECTION_COUNTS:
        schema.integer(selection, key, "selection")
    for name, counts in schema.obj(selection, "shards", "selection").items():
        for key in _SELECTION_COUNTS:
            schema.integer(counts, key, f"selection.shards.{name}")
    return selection


_SHARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*\.tar")


def _shard_record(d: dict, where: str) -> ShardRecord:
    name = schema.string(d, "name", where, _SHARD_NAME, "a plain file name ending in .tar (no folders)")
    size = schema.integer(d, "size", where) if isinstance(d, dict) and "size" in d else None
    return ShardRecord(name, schema.integer(d, "num_samples", where), schema.sha256(d, "sha256", where), size)


def manifest_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / MANIFEST_NAME


def held_out_folder(folder: str | os.PathLike) -> Path:
    """Where `synth generate` writes the held-out split of the shards in `folder`: `folder`/val."""
    return Path(folder) / VAL_SPLIT


def read_held_out(folder: str | os.PathLike) -> Manifest | None:
    """The manifest of the held-out split beside the shards in `folder` (finished or not: see `.complete`), or None
    when there is none (no `folder`/val/manifest.json) or `folder` is remote (not probed over the network)."""
    if is_remote(folder):
        return None
    val = held_out_folder(folder)
    if not manifest_path(val).is_file():
        return None
    return read_manifest(val, require_complete=False)


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
