"""Stage one: train a synthesis method against a frozen teacher, then write the synthetic dataset as
WebDataset shards plus a manifest (format: `common/shards.py`).

Restartable and deterministic:
  - the method's training checkpoints go to `<out>/state/`; a rerun continues from them;
  - shard i holds samples i*S .. (i+1)*S-1; its images depend only on (seed, i), so a redone shard
    has the same bytes; each shard is written under a temporary name and renamed when complete;
  - the manifest lists finished shards (checked by sha256 on resume) and is rewritten after each;
  - a rerun with another config or teacher into the same folder is refused (`overwrite=True` clears it);
  - one writer per folder (a lock file; a second `synth generate` into it is refused), temp files of
    killed writes are removed on start, and a full disk ends in a DiskFullError that names the file.

Computing (`device`, `amp`, `channels_last`, `compile`; common/accel.py): the teacher, the method and the
teacher's logits run on the device, noise is drawn from seeded CPU generators, and `synth/writer.py`
encodes and writes the shards in a pool of processes while the device works.

Under torchrun (WORLD_SIZE > 1) the same call is one rank of a job (each on its LOCAL_RANK GPU, nccl): the method is fitted once
(`SynthesisMethod.fit_parallel`: by default rank 0 fits and the others load its checkpoints; the
generator ensemble and MUSE split their generators across ranks), rank r writes shards r, r + N, r + 2N, ...
and records each finished one in `state/shards/<shard>.json`; rank 0 keeps the manifest and marks it
complete once every rank is done. As shard i depends only on (seed, i), the union is what one process
writes; a rerun (with any number of ranks) keeps every finished shard.

    from synth.generate import GenerateConfig, generate
    generate(GenerateConfig(teacher="lenet5", weights="teacher.pt", out="shards/mnist", num_images=50000))
"""
from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from common import distributed
from common.accel import Compute, check_amp, compile_module, resolve_device
from common.errors import DiskFullError, UserError
from common.faults import fault_point
from common.fileio import (LOCK_NAME, canonical_json, canonical_json_sha256, folder_lock, is_temp_file,
                           remove_stale_temps, sha256_file, write_json_atomic)
from common.models import create_model, state_dict_sha256
from common.shards import (IMAGE_FORMATS, INFO_NAME, MANIFEST_NAME, Manifest, ShardRecord, read_manifest, sample_key,
                           shard_name, write_manifest)

from .methods import METHODS, build_method
from .methods.base import seeded_generator
from .writer import PixelBatch, ShardJob, WriterPool, default_workers, pixels_to_uint8, write_shards

STATE_DIR = "state"
SHARD_RECORDS_DIR = "shards"  # inside STATE_DIR: one JSON record per finished shard (written by its rank)
# Ranks wait at barriers while rank 0 (or another rank) fits the method: allow hours.
DIST_TIMEOUT_MIN = 24 * 60


@dataclass
class GenerateConfig:
    teacher: str
    out: str = "shards"
    weights: str = "none"
    method: str = "generator"
    method_options: dict = field(default_factory=dict)
    num_images: int = 50_000
    shard_size: int = 5_000
    image_format: str = "png"
    resolution: int | None = None     # teacher input size; default: the model's own
    num_classes: int | None = None    # for teachers built with random weights
    seed: int = 0
    batch_size: int = 500             # images per synthesis/teacher batch when writing shards
    overwrite: bool = False
    progress: bool = True
    # where and how to compute (common/accel.py); amp, channels_last and compile may change the images
    device: str = "auto"              # auto | cpu | cuda | cuda:N (under torchrun: each rank its LOCAL_RANK GPU)
    amp: str = "none"                 # none | bf16 | fp16 (CUDA only)
    channels_last: bool = False
    compile: bool = False             # torch.compile teacher and generators
    write_workers: int | None = None  # processes encoding the shards; None: synth.writer.default_workers; 0: none


def generate(cfg: GenerateConfig) -> Manifest:
    """Run stage one to completion (or continue an interrupted run). Returns the final manifest.
    Under torchrun, every rank calls this and writes its share of the shards."""
    _check_options(cfg)
    device = distributed.device_for(resolve_device(cfg.device))
    check_amp(cfg.amp, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    compute = Compute(device, cfg.amp, cfg.channels_last, cfg.compile)
    with distributed.process_group(distributed.backend_for(device), timeout_min=DIST_TIMEOUT_MIN) as dist:
        return _generate(cfg, dist, compute)


def _generate(cfg: GenerateConfig, dist: distributed.DistInfo, compute: Compute) -> Manifest:
    torch.manual_seed(cfg.seed)
    teacher = create_model(cfg.teacher, num_classes=cfg.num_classes, weights=cfg.weights,
                           input_size=cfg.resolution).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    spec = teacher.input_spec
    teacher = compute.model(teacher)
    method = build_method(cfg.method, cfg.method_options, spec, cfg.num_images, compute)
    teacher_record = {
        "arch": cfg.teacher, "weights": cfg.weights,
        "weights_path": str(Path(cfg.weights).resolve()) if Path(cfg.weights).is_file() else None,
        "weights_sha256": state_dict_sha256(teacher), "input_spec": spec.to_dict()}
    config = {"method": cfg.method, "method_config": asdict(method.config), "teacher_arch": cfg.teacher,
              "teacher_sha256": teacher_record["weights_sha256"], "input_spec": spec.to_dict(),
              "num_images": cfg.num_images, "shard_size": cfg.shard_size, "image_format": cfg.image_format,
              "seed": cfg.seed, "batch_size": cfg.batch_size, "compute": compute.hashed()}
    out = Path(cfg.out)
    if dist.is_main:
        _make_folder(out)
    # one writer per folder: rank 0 holds the lock for the whole job, the other ranks are part of it
    with folder_lock(out, "synth generate") if dist.is_main else contextlib.nullcontext():
        try:
            return _write_dataset(cfg, out, method, teacher, config, teacher_record, dist, compute)
        except DiskFullError as e:
            raise e.with_fix("make room (free space, or raise the quota or limit) and rerun the same `synth generate`: "
                             "finished shards are kept") from None


def _write_dataset(cfg: GenerateConfig, out: Path, method, teacher, config: dict, teacher_record: dict,
                   dist: distributed.DistInfo, compute: Compute) -> Manifest:
    """Train the method and write every shard of this rank not yet finished (rank 0 holds the folder's lock)."""
    num_classes = teacher.input_spec.num_classes
    if dist.is_main:  # creates, checks or clears the folder; the other ranks then check what it wrote
        manifest = _open_output(out, cfg, config, teacher_record, num_classes)
        for folder in (out, out / STATE_DIR, out / STATE_DIR / SHARD_RECORDS_DIR):
            if folder.is_dir():
                remove_stale_temps(folder)
    distributed.barrier()
    if not dist.is_main:
        manifest = _open_output(out, replace(cfg, overwrite=False), config, teacher_record, num_classes)
    progress = cfg.progress and dist.is_main

    method.fit_parallel(teacher, out / STATE_DIR, progress=progress, seed=cfg.seed, rank=dist.rank,
                        world_size=dist.world_size, barrier=distributed.barrier)

    num_shards = -(-cfg.num_images // cfg.shard_size)
    mine = range(dist.rank, num_shards, dist.world_size)  # disjoint; their union is every shard
    done = _finished_shards(out, manifest, mine)
    bar = tqdm(total=len(mine), desc="shards" + (f" (rank 0 of {dist.world_size})" if dist.enabled else ""),
               disable=not progress, unit="shard")
    logits_of = _teacher_logits(teacher, compute)
    workers = cfg.write_workers
    if workers is None:
        workers = default_workers(distributed.default_threads(), compute.device)
    todo = [index for index in mine if index not in done]
    jobs = (ShardJob(out / shard_name(i), _shard_batches(cfg, method, i, _shard_indices(cfg, i))) for i in todo)
    bar.update(len(mine) - len(todo))
    with WriterPool(workers if todo else 0) as pool:
        for record in write_shards(jobs, logits_of, method.labels_from_teacher, cfg.image_format, pool):
            bar.update(1)
            fault_point("shard-done")
            _write_shard_record(out, record)
            if dist.is_main:  # the manifest has one writer; it lists every rank's shards finished so far
                manifest.shards = _collect_records(out, manifest)
                write_manifest(out, manifest)
            fault_point("shard-listed")
    distributed.barrier()  # every rank's shards are written
    if dist.is_main:
        manifest.shards = _collect_records(out, manifest)
        missing = sorted(set(shard_name(i) for i in range(num_shards)) - {r.name for r in manifest.shards})
        if missing:
            raise UserError(f"{len(missing)} shards have no record after all ranks finished (first: {missing[0]}); "
                            "rerun the same command to write them")
        manifest.complete = True
        write_manifest(out, manifest)
    distributed.barrier()  # the manifest is complete
    return manifest if dist.is_main else read_manifest(out)


def _make_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the shards")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out} ({e.strerror}); choose a writable folder") from None


def _check_options(cfg: GenerateConfig) -> None:
    if cfg.method not in METHODS:
        raise UserError(f"unknown method '{cfg.method}'; choose one of {', '.join(METHODS)}")
    if cfg.image_format not in IMAGE_FORMATS:
        raise UserError(f"image format must be one of {', '.join(IMAGE_FORMATS)}")
    for name in ("num_images", "shard_size", "batch_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.write_workers is not None and cfg.write_workers < 0:
        raise UserError("--write-workers must be at least 0 (0: encode in the main process)")
    if cfg.resolution is not None and cfg.resolution < 8:
        raise UserError("--resolution must be at least 8 pixels")


def _open_output(out: Path, cfg: GenerateConfig, config: dict, teacher_record: dict, num_classes: int) -> Manifest:
    """A fresh manifest for a new folder, or the existing one for a resumed run of the same config."""
    config_sha = canonical_json_sha256(config)
    if cfg.overwrite and out.exists():
        _clear_output(out)
    if out.exists() and (out / MANIFEST_NAME).exists():
        manifest = read_manifest(out, require_complete=False)
        if manifest.config_sha256 != config_sha:
            # the manifest's config went through JSON (tuples came back as lists): compare stored forms
            changed = sorted(k for k in config.keys() | manifest.config.keys()
                             if canonical_json(manifest.config.get(k)) != canonical_json(config.get(k)))
            raise UserError(f"{out} holds shards of another run (differs in: {', '.join(changed) or 'config'}); "
                            "use another --out, or --overwrite to delete them and start over")
        return manifest
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ("README.md", LOCK_NAME) and not is_temp_file(p))
    if foreign:
        raise UserError(f"{out} is not empty ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) and "
                        f"has no {MANIFEST_NAME}; use an empty or new --out folder")
    manifest = Manifest(teacher=teacher_record, num_classes=num_classes, image_format=cfg.image_format,
                        method=cfg.method, config=config, config_sha256=config_sha,
                        planned_samples=cfg.num_images, shard_size=cfg.shard_size)
    write_manifest(out, manifest)
    return manifest


def _clear_output(out: Path) -> None:
    """Delete what `synth generate` writes (shards, manifests, state), nothing else."""
    for p in out.iterdir():
        ours = p.name in (MANIFEST_NAME, INFO_NAME) or (p.name.startswith("shard-") and ".tar" in p.name)
        if ours or is_temp_file(p):
            p.unlink()
        elif p.name == STATE_DIR and p.is_dir():
            shutil.rmtree(p)


def _record_path(out: Path, name: str) -> Path:
    return out / STATE_DIR / SHARD_RECORDS_DIR / f"{name}.json"


def _write_shard_record(out: Path, record: ShardRecord) -> None:
    """Mark one shard finished (its rank's note for rank 0, which owns the manifest)."""
    path = _record_path(out, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, asdict(record))


def _collect_records(out: Path, manifest: Manifest) -> list[ShardRecord]:
    """The manifest's shard records updated with every per-shard record present, sorted by name."""
    records = {r.name: r for r in manifest.shards}
    folder = out / STATE_DIR / SHARD_RECORDS_DIR
    for path in sorted(folder.glob("shard-*.tar.json")) if folder.is_dir() else []:
        try:
            d = json.loads(path.read_text())
            size = d.get("size")
            records[d["name"]] = ShardRecord(str(d["name"]), int(d["num_samples"]), str(d["sha256"]),
                                             None if size is None else int(size))
        except (ValueError, KeyError, TypeError):
            continue  # a damaged note: that shard is redone by a rerun
    return sorted(records.values(), key=lambda r: r.name)


def _finished_shards(out: Path, manifest: Manifest, indices: range) -> set[int]:
    """Those of `indices` whose shard is recorded (manifest or per-shard note) and present and intact
    (others are redone)."""
    records = {r.name: r for r in _collect_records(out, manifest)}
    done = set()
    for index in indices:
        record, path = records.get(shard_name(index)), out / shard_name(index)
        if record is not None and path.is_file() and sha256_file(path) == record.sha256:
            done.add(index)
    return done


def _shard_indices(cfg: GenerateConfig, index: int) -> range:
    """The sample indices of shard `index`."""
    first = index * cfg.shard_size
    return range(first, min(first + cfg.shard_size, cfg.num_images))


def _teacher_logits(teacher, compute: Compute):
    """The teacher's logits (float32, on the device) for 8-bit (B, C, H, W) pixels, as a reader would feed
    them: /255, then the teacher's mean and std."""
    net = compile_module(teacher, compute.compile)
    spec = teacher.input_spec

    @torch.no_grad()
    def logits_of(pixels: torch.Tensor) -> torch.Tensor:
        with compute.autocast():
            return net(compute.batch(spec.normalize(pixels.float() / 255))).float()
    return logits_of


def _shard_batches(cfg: GenerateConfig, method, index: int, indices: range) -> Iterator[PixelBatch]:
    """The batches of one shard: class-balanced labels, round-robin ensemble members, images from the
    shard's own RNG (so a shard depends only on (seed, index)), as 8-bit pixels on the device."""
    spec = method.spec
    rng = seeded_generator(cfg.seed, index)
    all_idx = torch.tensor(list(indices))
    for start in range(0, len(all_idx), cfg.batch_size):
        idx = all_idx[start:start + cfg.batch_size]
        labels = idx % spec.num_classes
        streams = (idx // spec.num_classes) % method.num_streams
        pixels = pixels_to_uint8(method.synthesize(labels, streams, rng))
        metas = [{"stream": int(k), "shard_seed": int(rng.initial_seed()),
                  "resolution": method.stream_resolution(int(k)), "method": cfg.method} for k in streams.tolist()]
        yield PixelBatch([sample_key(int(j)) for j in idx], pixels, labels.to(pixels.device), metas)
