"""Stage one: train a synthesis method against a frozen teacher, then write the synthetic dataset as
WebDataset shards plus a manifest (format: `common/shards/`).

Restartable and deterministic:
  - the method's training checkpoints go to `<out>/state/`; a rerun continues from them;
  - shard i holds samples i*S .. (i+1)*S-1; its images depend only on (seed, i), so a redone shard
    has the same bytes; each shard is written under a temporary name and renamed when complete;
  - the manifest lists finished shards (checked by sha256 on resume) and is rewritten after each;
  - a rerun with another config or teacher into the same folder is refused (`overwrite=True` clears it);
  - one writer per folder (a lock file; a second `synth generate` into it is refused), temp files of
    killed writes are removed on start, and a full disk ends in a DiskFullError that names the file.

Held-out split (`val_images`, default a small share of `num_images`): once the training shards are
complete, the same trained method writes `<out>/val/`, a complete dataset folder of its own (shards,
manifest, state) made the same way, with each shard's RNG seeded by (seed, VAL_STREAM, shard) instead of
(seed, shard): no image in common with the training shards, whose bytes it never changes.
`distill train --val-shards` ranks epochs on it without real data.

Selection (`select`, `oversample`; synth/select.py): by default every image drawn is written. With `select`
boundary or confident, each writing batch of n slots draws ceil(oversample x n) candidates from the shard's
RNG, in rounds of the batch's own class pattern (class balance stays exact), runs the teacher on them
(`teacher_logits_fn`, as for the stored logits) and keeps per slot one candidate of the slot's class: of
those the teacher assigns to the class, the smallest margins (boundary: near a decision boundary, the
informative ones for distillation) or the largest (confident); too few such candidates and the class's
others fill the slot, nearest first, and are counted. Labels and stored logits are as without selection;
a shard still depends only on (seed, shard) and the config, the held-out split is selected the same way,
and the manifest's `selection` records the candidates, the images kept and the slots filled. Cost: the
method samples oversample x the images (DeepInversion optimises every candidate batch) and the teacher
sees each candidate once more. Not a recipe default: both modes lost to writing every image on the grey test
bed (results/mnistm-grey.md).

Computing (`device`, `amp`, `channels_last`, `compile`; common/accel.py): the teacher, the method and the
teacher's logits run on the device, noise is drawn from seeded CPU generators, and `synth/writer.py`
encodes and writes the shards in a pool of processes while the device works.

Under torchrun (WORLD_SIZE > 1) the same call is one rank of a job (each on its LOCAL_RANK GPU, nccl): the method is fitted once
(`SynthesisMethod.fit_parallel`: by default rank 0 fits and the others load its checkpoints; the
generator ensemble and MUSE split their generators across ranks), rank r writes shards r, r + N, r + 2N, ...
and records each finished one in `state/shards/<shard>.json`; rank 0 keeps the manifest and marks it
complete once every rank is done. As shard i depends only on (seed, i), the union is what one process
writes; a rerun (with any number of ranks) keeps every finished shard.

    from dfkd.synth.generate import GenerateConfig, generate
    generate(GenerateConfig(teacher="lenet5", weights="teacher.pt", out="shards/mnist", num_images=50000))
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from dfkd.common import distributed
from dfkd.common.accel import AMP_MODES, Compute, compile_module, prepare_device
from dfkd.common.errors import DiskFullError, UserError
from dfkd.common.faults import fault_point
from dfkd.common.fileio import (LOCK_NAME, canonical_json, canonical_json_sha256, folder_lock, is_temp_file, make_folder,
                                remove_stale_temps, sha256_file, write_json_atomic)
from dfkd.common import models, options
from dfkd.common.models import create_model
from dfkd.common.options import option, track_explicit
from dfkd.common.options import validate as validate_options
from dfkd.common.recipes import AUTO, Resolved, as_dict, resolve_recipe, shipped_names
from dfkd.common.shards import (IMAGE_FORMATS, INFO_NAME, MANIFEST_NAME, VAL_SPLIT, Manifest, ShardRecord,
                                TeacherRecord, build_manifest, read_manifest, sample_key, shard_name, write_manifest)

from . import estimate as timing
from .estimate import ESTIMATE_NAME, Estimate, Projection
from .methods import METHODS, build_method
from .methods.base import seeded_generator
from .select import COUNT_KEYS, SELECT_MODES, SelectionCount, select_batch
from .writer import PixelBatch, ShardJob, WriterPool, default_workers, pixels_to_uint8, time_batch, write_shards

STATE_DIR = "state"
SHARD_RECORDS_DIR = "shards"  # inside STATE_DIR: one JSON record per finished shard (written by its rank)
# Ranks wait at barriers while rank 0 (or another rank) fits the method: allow hours.
DIST_TIMEOUT_MIN = 24 * 60
# the held-out split: its shards' RNGs are seeded with (seed, VAL_STREAM, shard), never a training shard's
# (seed, shard); its default size is num_images / VAL_SHARE, within VAL_MIN..VAL_MAX and at most a tenth
# of num_images (for DeepInversion, which optimises every batch, it costs as much per image as training)
VAL_STREAM = 1
VAL_SHARE, VAL_MIN, VAL_MAX = 50, 500, 2000


@track_explicit
@dataclass
class GenerateConfig:
    """Stage one's options, each declared once (common/options.py): the `synth generate` flags, their help,
    checks, the config hash and the resume rules come from here. Fields the caller does not give come
    from the recipe (`recipe`, default auto: chosen from the teacher's input), else from these defaults."""

    # the subjects of `synth generate --help`, in its order; every command-line option names one (group=)
    HELP_GROUPS = ("Teacher", "Method", "Output", "Execution")
    RECIPE_TABLE = "synth"   # the recipe's table of these options; the methods': [synth.method.<name>]
    PLUGINS = METHODS

    teacher: str = option(help="Teacher architecture: lenet5, cifar_resnet20, resnet50, ..., timm/<name>, or "
                          "module.path:callable.", group="Teacher")
    weights: str = option("DEFAULT", group="Teacher", effect="none",
                          help="Teacher weights: DEFAULT / a torchvision weights name (download; timm's pretrained "
                          "weights for timm/<name>), a checkpoint path, or none (random; recorded by checksum).")
    out: str = option("shards", group="Output", effect="none", recipe=False,
                      help="Output folder for shards and manifest.")
    recipe: str = option(AUTO, group="Method", effect="none", recipe=False,
                         help="Settings to start from: a shipped recipe (" + ", ".join(shipped_names()) + "), a "
                         ".toml file, auto (chosen from the teacher's input: channels and size) or none (the "
                         "declared defaults). Explicit flags override it.")
    method: str = option("generator", group="Method", choices=tuple(METHODS),
                         help="Synthesis method (`synth methods` lists them).")
    method_options: dict = option(default_factory=dict, cli=False,
                                  help="Options of the method (`--set key=value`), over the recipe's method table.")
    num_images: int = option(50_000, group="Output", min=1, help="Images to synthesise.")
    select: str = option("none", group="Output", choices=SELECT_MODES,
                         help="Which images are written: none (every image drawn), or of --oversample x as many "
                         "candidates, per requested class, those the teacher assigns to the class with the smallest "
                         "margin (boundary: near a decision boundary) or the largest (confident). Costs the method's "
                         "sampling and a teacher pass per candidate; not a recipe default (results/mnistm-grey.md).")
    oversample: float = option(2.0, group="Output", min=1.0,
                               help="Candidates drawn per written image with --select boundary or confident "
                               "(ignored with none).")
    shard_size: int = option(5_000, group="Output", min=1, help="Images per shard.")
    image_format: str = option("png", group="Output", choices=IMAGE_FORMATS,
                               help="png (lossless), jpg (smaller, lossy) or npy (raw uint8, fastest to read; "
                               "not read by timm).")
    resolution: int | None = option(None, group="Teacher", min=8, help="Teacher input size (none: the model's own).")
    num_classes: int | None = option(None, group="Teacher", min=1,
                                     help="Classes of a teacher built with --weights none.")
    seed: int = option(0, group="Method", help="Seed of the method's training and of every shard's noise.")
    val_images: int | None = option(None, group="Output", min=0,
                                    help=f"Held-out synthetic images written to <out>/{VAL_SPLIT}/ (other seeds than "
                                    "the training shards, which it never changes) for `distill train "
                                    f"--val-shards`; none: {100 // VAL_SHARE}% of --num-images, at least {VAL_MIN} "
                                    f"and at most {VAL_MAX} but at most a tenth of --num-images; 0: none.")
    write_batch_size: int = option(500, group="Output", min=1,
                                   help="Images per batch when writing shards (changes MUSE's and "
                                   "DeepInversion's images, and with --select which ones are kept: part of the "
                                   "config a rerun must match).")
    overwrite: bool = option(False, group="Output", effect="none", recipe=False,
                             help="Delete earlier output in --out and start over.")
    progress: bool = option(True, effect="none", cli=False, help="Progress bars.")
    device: str = option("auto", group="Execution",
                         help="auto (CUDA when available), cpu, cuda or cuda:N; under torchrun each "
                         "process takes its LOCAL_RANK GPU. The device type is part of the config hash.")
    amp: str = option("none", group="Execution", choices=AMP_MODES,
                      help="Autocast teacher and generators to bfloat16 (CPU or GPU) or float16 (GPU, GradScaler). "
                      "Changes the images.")
    channels_last: bool = option(False, help="NHWC memory layout for teacher and generators (faster convolutions "
                                 "on GPUs). Can change the images in the last bits.", group="Execution")
    compile: bool = option(False, help="torch.compile teacher and generators (compiles in the first steps). Can "
                           "change the images in the last bits.", group="Execution")
    write_workers: int | None = option(None, group="Execution", min=0, effect="none",
                                       help="Processes that encode and tar the images while the device works "
                                       "(none: at most 16, on a GPU the process's cores - 1, on the CPU the cores "
                                       "its torch threads leave free; 0: encode in the main process). Never "
                                       "changes the bytes.")
    estimate: bool = option(False, group="Execution", effect="none", recipe=False,
                            help="Write no shards: time a few training steps and writing batches on this device, "
                            "then print the projected hours, images/s and disk bytes for --num-images (also "
                            "saved as estimate.json in --out).")
    launch_s: float = option(0.0, min=0.0, cli=False, effect="none",
                             help="Seconds the process took before calling generate (interpreter, imports): part of "
                             "--estimate's startup (the CLI sets it).")

    def validate(self) -> None:
        validate_options(self)


# GenerateConfig options that the manifest's `options` record leaves out (execution of one invocation)
_INVOCATION_ONLY = ("out", "overwrite", "progress", "write_workers", "estimate", "launch_s")
# hashed GenerateConfig options that the config hash records in another form (val_images: in the held-out
# split's config, so that it never changes the training manifest's hash)
_HASHED_ELSEWHERE = ("method_options", "device", "amp", "channels_last", "compile", "val_images")


def val_count(cfg: GenerateConfig) -> int:
    """The number of held-out images: `val_images`, or the default share of `num_images` (see its help)."""
    if cfg.val_images is not None:
        return cfg.val_images
    return min(VAL_MAX, max(VAL_MIN, cfg.num_images // VAL_SHARE), cfg.num_images // 10)


@dataclass(frozen=True)
class Split:
    """One set of shards that `synth generate` writes: the training shards in --out (stream ()), the
    held-out ones in --out/val (stream (VAL_STREAM,)). Shard i holds samples i*S .. (i+1)*S-1 of the split,
    drawn from an RNG seeded by (seed, *stream, i)."""

    folder: Path
    num_images: int
    shard_size: int
    stream: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict)   # added to every sample's metadata

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def indices(self, index: int) -> range:
        """The sample indices of shard `index`."""
        first = index * self.shard_size
        return range(first, min(first + self.shard_size, self.num_images))

    def rng(self, seed: int, index: int) -> torch.Generator:
        return seeded_generator(seed, *self.stream, index)


def generate(cfg: GenerateConfig) -> Manifest | Estimate:
    """Run stage one to completion (or continue an interrupted run). Returns the final manifest; with
    `cfg.estimate`, writes no shards and returns the projection instead (`synth/estimate.py`).
    Under torchrun, every rank calls this and writes its share of the shards. The recipe (`cfg.recipe`)
    fills the options `cfg`'s caller did not give; the start line on stderr says which one and why."""
    started = time.perf_counter()
    cfg.validate()
    if cfg.estimate and distributed.info().enabled:
        raise UserError("--estimate runs in one process: run it without torchrun (the projection is for one "
                        "process on one device)")
    resolved, teacher = _resolve_and_build_teacher(cfg)
    cfg = resolved.config
    if distributed.info().is_main:
        print(resolved.reason, file=sys.stderr, flush=True)
    device = prepare_device(cfg.device, cfg.amp)
    compute = Compute(device, cfg.amp, cfg.channels_last, cfg.compile)
    if distributed.info().is_main and not cfg.estimate:
        _warn_if_slow(cfg, device, teacher.input_spec)
    with distributed.process_group(distributed.backend_for(device), timeout_min=DIST_TIMEOUT_MIN) as dist:
        return _generate(resolved, teacher, dist, compute, started)


def _warn_if_slow(cfg: GenerateConfig, device: torch.device, spec) -> None:
    """A CPU and an ImageNet-size teacher: say at once that this takes days, and what to do instead."""
    if device.type != "cpu" or spec.size < timing.LARGE_INPUT:
        return
    print(f"warning: synthesising on the CPU for a {spec.size} px teacher ({cfg.teacher}): each training step takes "
          "a minute or more and the whole run days. Use a CUDA GPU (--device cuda), see the hours first with the same "
          "command plus --estimate, or shorten it (--set steps=N, fewer --num-images)", file=sys.stderr, flush=True)


def _resolve_and_build_teacher(cfg: GenerateConfig) -> tuple[Resolved, torch.nn.Module]:
    """The resolved config and its teacher (on the CPU), built once, after seeding with the resolved seed
    (random weights depend on it). The automatic recipe is chosen from the teacher's input, so there the
    teacher is built first, from the options given; the shipped recipes it chooses from never set how the
    teacher is built (`_TEACHER_FIELDS`; test_recipes keeps it so). A named recipe is resolved first."""
    if cfg.recipe in (None, "", AUTO):
        torch.manual_seed(cfg.seed)
        teacher = _build_teacher(cfg)
        resolved = resolve_recipe(cfg, teacher.input_spec)
        changed = [k for k in _TEACHER_FIELDS if getattr(resolved.config, k) != getattr(cfg, k)]
        if changed:  # a shipped recipe that sets how the teacher is built: a bug of ours, not the user's
            raise AssertionError(f"shipped recipe {resolved.recipe.name} sets {', '.join(changed)}")
        return resolved, teacher
    resolved = resolve_recipe(cfg)
    torch.manual_seed(resolved.config.seed)
    return resolved, _build_teacher(resolved.config)


def _build_teacher(cfg: GenerateConfig):
    teacher = create_model(cfg.teacher, num_classes=cfg.num_classes, weights=cfg.weights,
                           input_size=cfg.resolution).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# the options that say how the teacher is built (and its random weights: the seed)
_TEACHER_FIELDS = ("teacher", "weights", "resolution", "num_classes", "seed")


def _generate(resolved: Resolved, teacher, dist: distributed.DistInfo, compute: Compute,
              started: float) -> Manifest | Estimate:
    cfg = replace(resolved.config, val_images=val_count(resolved.config))
    spec = teacher.input_spec
    teacher_record = models.teacher_record(cfg.teacher, cfg.weights, teacher)
    teacher = compute.model(teacher)
    method = build_method(cfg.method, resolved.plugin, spec, cfg.num_images, compute)
    config = {k: v for k, v in options.hashed(cfg).items() if k not in _HASHED_ELSEWHERE}
    config |= {"method_config": options.hashed(method.config), "teacher_sha256": teacher_record.weights_sha256,
               "input_spec": spec.to_dict(), "compute": compute.hashed()}
    # the resolved options, without those of this invocation only (--out, --overwrite, progress, writers):
    # the manifest stays the same when the folder moves or a rerun uses other execution settings
    # (and without val_images: the held-out split's manifest records it, so the training manifest's bytes do
    # not depend on the split)
    kept = {k: v for k, v in asdict(cfg).items() if k not in _INVOCATION_ONLY and k != "val_images"}
    record = {"recipe": resolved.record(),
              "options": {"generate": as_dict(kept), "method": as_dict(asdict(method.config))}}
    out = Path(cfg.out)
    if dist.is_main:
        make_folder(out)
    if cfg.estimate:
        return _estimate(cfg, out, method, teacher, compute, started)
    # one writer per folder: rank 0 holds the lock for the whole job, the other ranks are part of it
    with folder_lock(out, "synth generate") if dist.is_main else contextlib.nullcontext():
        try:
            return _write_dataset(cfg, out, method, teacher, config, teacher_record, dist, compute, record,
                                  started)
        except DiskFullError as e:
            raise e.with_fix("make room (free space, or raise the quota or limit) and rerun the same `synth generate`: "
                             "finished shards are kept") from None


def _write_dataset(cfg: GenerateConfig, out: Path, method, teacher, config: dict, teacher_record: TeacherRecord,
                   dist: distributed.DistInfo, compute: Compute, record: dict, started: float) -> Manifest:
    """Train the method and write every shard of this rank not yet finished, the training shards first, then
    the held-out split's (rank 0 holds the folder's lock, which covers both). The training shards' progress
    is projected to the whole run (printed once the first steps and the first shard are timed)."""
    if dist.is_main:  # creates, checks or clears the folder; the other ranks then check what it wrote
        manifest = _open_output(out, cfg, config, teacher_record, record)
        for split in (out, out / VAL_SPLIT):
            for folder in (split, split / STATE_DIR, split / STATE_DIR / SHARD_RECORDS_DIR):
                if folder.is_dir():
                    remove_stale_temps(folder)
    distributed.barrier()
    if not dist.is_main:
        manifest = _open_output(out, replace(cfg, overwrite=False), config, teacher_record, record)
    progress = cfg.progress and dist.is_main
    projection = Projection(compute.device, cfg.num_images, started - cfg.launch_s, enabled=dist.is_main,
                            later_images=cfg.val_images or 0)
    projection.watch_training(method)

    method.fit_parallel(teacher, out / STATE_DIR, progress=progress, seed=cfg.seed, rank=dist.rank,
                        world_size=dist.world_size, barrier=distributed.barrier)

    _write_split(cfg, Split(out, cfg.num_images, cfg.shard_size), manifest, method, teacher, dist, compute,
                 "shards", projection)
    if cfg.val_images:
        val = Split(out / VAL_SPLIT, cfg.val_images, min(cfg.shard_size, cfg.val_images), (VAL_STREAM,),
                    {"split": VAL_SPLIT})
        val_config = config | {"split": VAL_SPLIT, "val_images": cfg.val_images}
        val_cfg = replace(cfg, num_images=val.num_images, shard_size=val.shard_size, overwrite=False)
        if dist.is_main:
            make_folder(val.folder)
            val_manifest = _open_val_output(val.folder, val_cfg, val_config, teacher_record, record)
        distributed.barrier()
        if not dist.is_main:
            val_manifest = _open_val_output(val.folder, val_cfg, val_config, teacher_record, record)
        _write_split(val_cfg, val, val_manifest, method, teacher, dist, compute, "held-out shards")
    return manifest if dist.is_main else read_manifest(out)


def _write_split(cfg: GenerateConfig, split: Split, manifest: Manifest, method, teacher, dist: distributed.DistInfo,
                 compute: Compute, desc: str, projection: Projection | None = None) -> None:
    """Write every shard of `split` that this rank owns and that is not finished yet; rank 0 keeps the
    split's manifest and marks it complete once every rank is done. `projection`: told of every batch and
    shard (the training split's, for the whole run's projection)."""
    out, progress = split.folder, cfg.progress and dist.is_main
    num_shards = split.num_shards
    mine = range(dist.rank, num_shards, dist.world_size)  # disjoint; their union is every shard
    done = _finished_shards(out, manifest, mine)
    bar = tqdm(total=len(mine), desc=desc + (f" (rank 0 of {dist.world_size})" if dist.enabled else ""),
               disable=not progress, unit="shard")
    logits_of = teacher_logits_fn(teacher, compute)
    workers = _writer_count(cfg, compute)
    todo = [index for index in mine if index not in done]
    watch = projection.watch_batches if projection is not None else (lambda batches: batches)
    counts = {shard_name(i): SelectionCount() for i in todo} if cfg.select != "none" else {}
    jobs = (ShardJob(out / shard_name(i), watch(shard_batches(cfg, method, split.rng(cfg.seed, i), split.indices(i),
                                                               split.meta, logits_of=logits_of,
                                                               count=counts.get(shard_name(i)))))
            for i in todo)
    bar.update(len(mine) - len(todo))
    images_left = sum(len(split.indices(i)) for i in todo) * dist.world_size  # about: every rank's share
    with WriterPool(workers if todo else 0) as pool:
        for record in write_shards(jobs, logits_of, method.labels_from_teacher, cfg.image_format, pool):
            images_left -= record.num_samples * dist.world_size
            if projection is not None:
                projection.shard_done(record.size or 0, record.num_samples, max(0, images_left))
            bar.update(1)
            fault_point("shard-done")
            _write_shard_record(out, record, counts.get(record.name))
            if dist.is_main:  # the manifest has one writer; it lists every rank's shards finished so far
                _update_manifest(out, manifest, cfg.select)
                write_manifest(out, manifest)
            fault_point("shard-listed")
    distributed.barrier()  # every rank's shards are written
    if dist.is_main:
        _update_manifest(out, manifest, cfg.select)
        missing = sorted(set(shard_name(i) for i in range(num_shards)) - {r.name for r in manifest.shards})
        if missing:
            raise UserError(f"{len(missing)} shards have no record after all ranks finished (first: {missing[0]}); "
                            "rerun the same command to write them")
        manifest.complete = True
        write_manifest(out, manifest)
    distributed.barrier()  # the manifest is complete


def _writer_count(cfg: GenerateConfig, compute: Compute) -> int:
    if cfg.write_workers is not None:
        return cfg.write_workers
    return default_workers(distributed.default_threads(), compute.device)


def _estimate(cfg: GenerateConfig, out: Path, method, teacher, compute: Compute, started: float) -> Estimate:
    """`--estimate`: time the first training steps (on a copy of the method, in a temporary state folder) and
    writing batches (through the real writer pool; nothing is written), project them to the whole run, and
    record the projection as `<out>/estimate.json`."""
    workers = _writer_count(cfg, compute)
    startup_s = cfg.launch_s + time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="synth-estimate-") as tmp:
        train, fitted = timing.time_training(
            method, lambda m: m.fit(teacher, Path(tmp), progress=False, seed=cfg.seed), compute.device)
        logits_of = teacher_logits_fn(teacher, compute)
        split = Split(out, cfg.num_images, cfg.shard_size)
        batches = (b for i in range(split.num_shards)
                   for b in shard_batches(cfg, fitted, split.rng(cfg.seed, i), split.indices(i), split.meta,
                                          logits_of=logits_of))
        total_batches = sum(-(-len(split.indices(i)) // cfg.write_batch_size) for i in range(split.num_shards))
        with WriterPool(workers) as pool:
            clock, device_s, encode_s, nbytes, images = timing.time_writing(
                batches, lambda b: time_batch(b, logits_of, fitted.labels_from_teacher, cfg.image_format, pool),
                compute.device, total_batches)
    # the run writes the held-out split too (cfg.val_images, resolved by _generate): it is part of the projection
    result = timing.project(device=compute.device, method=method, num_images=cfg.num_images + (cfg.val_images or 0),
                            val_images=cfg.val_images or 0, write_batch_size=cfg.write_batch_size, workers=workers,
                            startup_s=startup_s,
                            train=train if method.training_steps() else None, batch_device_s=device_s,
                            batch_encode_s=encode_s, write_clock=clock, nbytes=nbytes, images=images,
                            measured_s=time.perf_counter() - started)
    write_json_atomic(out / ESTIMATE_NAME, asdict(result))
    return result


def _open_output(out: Path, cfg: GenerateConfig, config: dict, teacher_record: TeacherRecord,
                 record: dict) -> Manifest:
    """A fresh manifest for a new folder, or the existing one for a resumed run of the same config."""
    if cfg.overwrite and out.exists():
        _clear_output(out)
    if out.exists() and (out / MANIFEST_NAME).exists():
        manifest = read_manifest(out, require_complete=False)
        if not _made_with(manifest, config):
            raise UserError(f"{out} holds shards made with other settings ({_config_changes(manifest.config, config)}); "
                            "rerun with the same flags and recipe to continue it, --overwrite to delete them and "
                            "start over, or another --out")
        return manifest
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in ("README.md", LOCK_NAME, ESTIMATE_NAME) and not is_temp_file(p))
    if foreign:
        raise UserError(f"{out} is not empty ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) and "
                        f"has no {MANIFEST_NAME}; use an empty or new --out folder")
    manifest = build_manifest(teacher_record, method=cfg.method, config=config, image_format=cfg.image_format,
                              planned_samples=cfg.num_images, shard_size=cfg.shard_size, **record)
    write_manifest(out, manifest)
    return manifest


def _open_val_output(out: Path, cfg: GenerateConfig, config: dict, teacher_record: TeacherRecord,
                     record: dict) -> Manifest:
    """The held-out split's manifest (`_open_output` on <out>/val); one made with other settings is refused
    with its own fix: deleting it costs only the held-out images."""
    if (out / MANIFEST_NAME).exists():
        manifest = read_manifest(out, require_complete=False)
        if not _made_with(manifest, config):
            raise UserError(f"{out} holds a held-out split made with other settings "
                            f"({_config_changes(manifest.config, config)}); rerun with the same flags, or delete "
                            f"{out} to write it anew (the training shards are kept), or pass --val-images 0")
    return _open_output(out, cfg, config, teacher_record, record)


def _made_with(manifest: Manifest, config: dict) -> bool:
    """Whether a folder's shards were made with `config`: the same hash, or the same but for options declared
    since the folder was written that are at their declared defaults (those write what was written before)."""
    if manifest.config_sha256 == canonical_json_sha256(config):
        return True
    added = {s.name for s in options.options_of(GenerateConfig)
             if s.name in config and s.name not in manifest.config and config[s.name] == s.default}
    trimmed = {k: v for k, v in config.items() if k not in added}
    method, recorded = config.get("method_config"), manifest.config.get("method_config")
    if isinstance(method, dict) and isinstance(recorded, dict) and config.get("method") in METHODS:
        new_options = {s.name for s in options.options_of(METHODS[config["method"]].Config)
                       if s.name in method and s.name not in recorded and method[s.name] == s.default}
        if new_options:
            added |= new_options
            trimmed["method_config"] = {k: v for k, v in method.items() if k not in new_options}
    return bool(added) and manifest.config_sha256 == canonical_json_sha256(trimmed)


def _config_changes(old: dict, new: dict) -> str:
    """'--num-images 96000 there, 50 now; ...' for the hashed settings that differ between two configs (an
    option the older config lacks counts as its declared default)."""
    def show(v):
        return "unset" if v is None else canonical_json(v)

    specs = {s.name: s for s in options.options_of(GenerateConfig)}
    parts = []
    for change in options.differences(old, new, defaults=options.declared_defaults(GenerateConfig)):
        key, a, b = change.name, change.old, change.new
        if key in specs:
            parts.append(f"{specs[key].flag_name} {show(a)} there, {show(b)} now")
        elif key in ("method_config", "compute") and isinstance(a, dict) and isinstance(b, dict):
            method_cls = METHODS[new["method"]].Config if new.get("method") in METHODS else None
            defaults = (options.declared_defaults(method_cls)
                        if key == "method_config" and method_cls is not None else None)
            for sub in options.differences(a, b, defaults=defaults):
                what = f"method option {sub.name}" if key == "method_config" else f"--{sub.name.replace('_', '-')}"
                parts.append(f"{what} {show(sub.old)} there, {show(sub.new)} now")
        elif key == "teacher_sha256":
            parts.append("the teacher's weights differ (--weights)")
        else:
            parts.append(f"{key} {show(a)} there, {show(b)} now")
    return "; ".join(parts) or "config"


def _clear_output(out: Path, held_out: bool = True) -> None:
    """Delete what `synth generate` writes (shards, manifests, state, and with `held_out` the held-out
    split's), nothing else."""
    for p in out.iterdir():
        ours = p.name in (MANIFEST_NAME, INFO_NAME) or (p.name.startswith("shard-") and ".tar" in p.name)
        if ours or is_temp_file(p):
            p.unlink()
        elif p.name == STATE_DIR and p.is_dir():
            shutil.rmtree(p)
        elif p.name == VAL_SPLIT and p.is_dir() and held_out:
            _clear_output(p, held_out=False)
            with contextlib.suppress(OSError):  # kept when it holds files of the user's
                p.rmdir()


def _record_path(out: Path, name: str) -> Path:
    return out / STATE_DIR / SHARD_RECORDS_DIR / f"{name}.json"


def _write_shard_record(out: Path, record: ShardRecord, count: SelectionCount | None = None) -> None:
    """Mark one shard finished (its rank's note for rank 0, which owns the manifest), with what the
    selection did in it (`count`; --select)."""
    path = _record_path(out, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, asdict(record) | ({"selection": count.to_dict()} if count is not None else {}))


def _update_manifest(out: Path, manifest: Manifest, select: str) -> None:
    """The manifest's shards and selection record brought up to date with every rank's notes."""
    manifest.shards = _collect_records(out, manifest)
    manifest.selection = _collect_selection(out, manifest, select)


def _collect_selection(out: Path, manifest: Manifest, select: str) -> dict | None:
    """The manifest's `selection` record (None without --select): per listed shard what the selection did
    there (from the manifest, updated with the per-shard notes; a shard kept from an earlier run keeps its
    counts) and the totals."""
    if select == "none":
        return None
    shards = dict((manifest.selection or {}).get("shards", {}))
    folder = out / STATE_DIR / SHARD_RECORDS_DIR
    for path in sorted(folder.glob("shard-*.tar.json")) if folder.is_dir() else []:
        try:
            d = json.loads(path.read_text())
            shards[str(d["name"])] = {key: int(d["selection"][key]) for key in COUNT_KEYS}
        except (ValueError, KeyError, TypeError):
            continue  # a damaged note, or one without selection
    listed = {r.name for r in manifest.shards}
    shards = {name: shards[name] for name in sorted(shards) if name in listed}
    totals = {key: sum(counts[key] for counts in shards.values()) for key in COUNT_KEYS}
    return {"select": select, **totals, "shards": shards}


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


def teacher_logits_fn(teacher, compute: Compute):
    """The teacher's logits (float32, on the device) for 8-bit (B, C, H, W) pixels, as a reader would feed
    them: /255, then the teacher's mean and std."""
    net = compile_module(teacher, compute.compile)
    spec = teacher.input_spec

    @torch.no_grad()
    def logits_of(pixels: torch.Tensor) -> torch.Tensor:
        with compute.autocast():
            return net(compute.batch(spec.normalize(pixels.float() / 255))).float()
    return logits_of


def shard_batches(cfg: GenerateConfig, method, rng: torch.Generator, indices: range, meta: dict | None = None, *,
                  logits_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  count: SelectionCount | None = None) -> Iterator[PixelBatch]:
    """The batches of one shard: class-balanced labels, round-robin ensemble members, images from the
    shard's own RNG `rng` (so a shard depends only on its seed), as 8-bit pixels on the device. `meta` is
    added to every sample's metadata. With `cfg.select` each batch keeps the candidates the teacher
    (`logits_of`, as `teacher_logits_fn` gives it) chooses (synth/select.py; `count` is told how); a sample's
    `stream` is then the member that made the candidate kept."""
    if cfg.select != "none" and logits_of is None:
        raise TypeError(f"select={cfg.select!r} needs the teacher's logits_of")
    spec = method.spec
    all_idx = torch.tensor(list(indices))
    for start in range(0, len(all_idx), cfg.write_batch_size):
        idx = all_idx[start:start + cfg.write_batch_size]
        labels = idx % spec.num_classes
        streams = (idx // spec.num_classes) % method.num_streams
        if cfg.select == "none":
            pixels = pixels_to_uint8(method.synthesize(labels, streams, rng))
        else:
            pixels, streams = select_batch(method, labels, streams, rng, logits_of, cfg.select, cfg.oversample, count)
        metas = [{"stream": int(k), "shard_seed": int(rng.initial_seed()),
                  "resolution": method.stream_resolution(int(k)), "method": cfg.method} | (meta or {})
                 for k in streams.tolist()]
        yield PixelBatch([sample_key(int(j)) for j in idx], pixels, labels.to(pixels.device), metas)
