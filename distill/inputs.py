"""What a run reads, built and checked before its folder is touched: the shards (checked against the
manifest, damaged ones refused or skipped), the teacher, the student, the loader and the evaluation data."""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from tqdm import tqdm

from dfkd.common import distributed
from dfkd.common.errors import UserError
from dfkd.common.remote import Retry
from dfkd.common.shards import Manifest, check_shard_files, read_manifest

from .config import TrainConfig
from .data import ShardLoader
from .datasets import real_dataset
from .nets import build_student, check_models_fit, load_teacher
from .throughput import to_memory_format
from .validation import ValSet


def select_shards(config: TrainConfig, manifest: Manifest, log,
                  bad: dict[str, str] | None = None) -> tuple[Manifest, dict[str, str]]:
    """Check the shard files against the manifest before the first step (`config.verify_shards`; or take
    `bad`, the verdict of rank 0's check). Returns the manifest of the shards to train on and {skipped
    shard: why}. With on_bad_shard 'error' any damaged shard is a UserError; with 'skip' it is left out,
    counted and reported."""
    if bad is None:
        bad = check_shard_files(config.shards, manifest, config.verify_shards)
    if not bad:
        return manifest, {}
    listing = "; ".join(f"{name}: {why}" for name, why in list(bad.items())[:3]) + ("; ..." if len(bad) > 3 else "")
    if config.on_bad_shard == "error":
        raise UserError(f"{len(bad)} of {len(manifest.shards)} shards in {config.shards} do not match the manifest "
                        f"({listing}): rerun the same `synth generate` to redo them (`synth verify {config.shards}` "
                        "lists them), or pass --on-bad-shard skip to train without them")
    kept = [s for s in manifest.shards if s.name not in bad]
    if not kept:
        raise UserError(f"all {len(bad)} shards in {config.shards} are damaged ({listing}); regenerate them")
    lost = sum(s.num_samples for s in manifest.shards if s.name in bad)
    log(f"warning: skipping {len(bad)} of {len(manifest.shards)} shards ({lost} of {manifest.num_samples} samples) "
        f"that do not match the manifest (--on-bad-shard skip): {listing}")
    return replace(manifest, shards=kept, planned_samples=manifest.planned_samples - lost), bad



@dataclass
class RunInputs:
    """Everything a run reads, built and checked before its folder is touched."""

    manifest: Manifest              # of the shards trained on (skipped ones left out)
    skipped: dict[str, str]         # shard name -> why it was left out (--on-bad-shard skip)
    device: torch.device
    teacher: nn.Module | None       # None: stored logits
    student: nn.Module
    loader: ShardLoader
    eval_student: object = None     # real evaluation data in each model's input space, or None (and on ranks > 0)
    eval_teacher: object = None
    val: ValSet | None = None       # the held-out synthetic split (--val-shards), or None


def stream_retry(config: TrainConfig) -> Retry:
    """How a failed transfer of a remote shard is retried (--shard-attempts, --shard-retry-seconds,
    --shard-read-timeout)."""
    return Retry(config.shard_attempts, config.shard_retry_seconds, config.shard_read_timeout)


def prepare_inputs(config: TrainConfig, device: torch.device,
                   dist: distributed.DistInfo = distributed.DistInfo(), manifest: Manifest | None = None) -> RunInputs:
    """Read (unless given `manifest`) and check the shards, models and evaluation data (UserError before
    any file is written). In a distributed run rank 0 checks the shard files and the others take its verdict."""
    manifest = read_manifest(config.shards) if manifest is None else manifest
    bad = None
    if dist.enabled:
        bad = check_shard_files(config.shards, manifest, config.verify_shards) if dist.is_main else None
        bad = distributed.broadcast_object(bad)
    manifest, skipped = select_shards(config, manifest, _warn if dist.is_main else (lambda message: None), bad)
    torch.manual_seed(config.seed)
    teacher = None if config.teacher_logits == "stored" else load_teacher(manifest, config.teacher_weights, device)
    student = to_memory_format(build_student(config, manifest).to(device), config.channels_last)
    check_models_fit(teacher, student, manifest, config.student, device)
    if dist.enabled:  # the same initial weights everywhere (DDP also broadcasts rank 0's); then own draws
        torch.manual_seed(config.seed + dist.rank)
    loader = ShardLoader(config.shards, manifest, config.batch_size_per_rank, config.workers, config.aug, config.seed,
                         rank=dist.rank, world_size=dist.world_size, skip_bad=config.on_bad_shard == "skip",
                         pin_memory=config.pin_memory and device.type == "cuda",
                         persistent_workers=config.persistent_workers, verify=config.verify_shards,
                         with_meta=config.teacher_view == "native", retry=stream_retry(config))
    inputs = RunInputs(manifest, skipped, device, teacher, student, loader)
    if config.eval_data and dist.is_main:  # an ImageFolder is decoded once here: a damaged image stops the run now
        inputs.eval_student = real_dataset(config.eval_data, student.input_spec, train=False, root=config.data_root,
                                           workers=config.workers)
        if teacher is not None:
            inputs.eval_teacher = inputs.eval_student if teacher.input_spec == student.input_spec else real_dataset(
                config.eval_data, teacher.input_spec, train=False, root=config.data_root, check=False,
                workers=config.workers)  # streamed: checked above; cached at the teacher's size: decoded here
    return inputs



def _warn(message: str) -> None:
    tqdm.write(message, file=sys.stderr)

