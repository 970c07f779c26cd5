"""What a run reads, built and checked before its folder is touched: the shards (checked against the
manifest, damaged ones refused or skipped), the teacher, the student, the loader, the evaluation data and
the held-out synthetic split (found beside the shards or named, checked against them: validation.py)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from dfkd.common import distributed
from dfkd.common.accel import to_memory_format
from dfkd.common.errors import UserError
from dfkd.common.remote import Retry, is_remote
from dfkd.common.shards import (VAL_SPLIT, Manifest, check_shard_files, held_out_folder, held_out_mismatch,
                                read_held_out, read_manifest)

from .config import TrainConfig
from .data import ShardLoader
from .datasets import real_dataset
from .evaluation import Evaluation
from .nets import build_student, check_models_fit, load_teacher
from .validation import AUTO, NONE, ValSet


def select_shards(shards: str, manifest: Manifest, bad: dict[str, str], on_bad_shard: str,
                  log) -> tuple[Manifest, dict[str, str]]:
    """The shards to train on, given `bad`, those of `shards` that do not match the manifest ({name: why}).
    Returns their manifest and {skipped shard: why}. With `on_bad_shard` 'error' any damaged shard is a
    UserError; with 'skip' it is left out, counted and reported."""
    if not bad:
        return manifest, {}
    listing = "; ".join(f"{name}: {why}" for name, why in list(bad.items())[:3]) + ("; ..." if len(bad) > 3 else "")
    if on_bad_shard == "error":
        raise UserError(f"{len(bad)} of {len(manifest.shards)} shards in {shards} do not match the manifest "
                        f"({listing}): rerun the same `synth generate` to redo them (`synth verify {shards}` "
                        "lists them), or pass --on-bad-shard skip to train without them")
    kept = [s for s in manifest.shards if s.name not in bad]
    if not kept:
        raise UserError(f"all {len(bad)} shards in {shards} are damaged ({listing}); regenerate them")
    lost = sum(s.num_samples for s in manifest.shards if s.name in bad)
    log(f"warning: skipping {len(bad)} of {len(manifest.shards)} shards ({lost} of {manifest.num_samples} samples) "
        f"that do not match the manifest (--on-bad-shard skip): {listing}")
    return replace(manifest, shards=kept, planned_samples=manifest.planned_samples - lost), bad


def auto_location(shards: str) -> str | None:
    """The held-out split beside local training shards (`<shards>/val` with a complete manifest), or None.
    A split still being written is left out with a note on stderr."""
    held_out = read_held_out(shards)   # None for remote shards too: not probed over the network (--val-shards URL)
    if held_out is None:
        return None
    folder = held_out_folder(shards)
    if not held_out.complete:
        print(f"note: {folder} is unfinished (rerun the same `synth generate` to finish it): no validation signal "
              "this run", file=sys.stderr, flush=True)
        return None
    return str(folder)


def open_val_set(value: str, shards: str, train_manifest: Manifest, verify: str = "full",
                 check_files: bool = True, retry: Retry = Retry()) -> ValSet | None:
    """The split `--val-shards value` names (auto: `auto_location`; none: None), checked: a complete shard
    folder of the same teacher, classes and image size as the training shards, synthetic, not the
    training shards themselves, its files matching its manifest (`verify`, when `check_files`)."""
    if value == NONE:
        return None
    location = auto_location(shards) if value == AUTO else value
    if location is None:
        return None
    fix = f"pass the {VAL_SPLIT}/ split `synth generate` wrote beside --shards, or --val-shards none"
    try:
        manifest = read_manifest(location)
    except UserError as e:
        raise UserError(f"--val-shards {location}: {e.message}; or {fix}") from None
    same = (location.rstrip("/") == str(shards).rstrip("/") if is_remote(location) or is_remote(shards)
            else Path(location).resolve() == Path(shards).resolve())
    if same:
        raise UserError(f"--val-shards {location} is the training shards; {fix}")
    if manifest.method.startswith("real"):
        raise UserError(f"--val-shards {location} holds real images ({manifest.method}): the validation signal "
                        f"is synthetic, so that no real data chooses the checkpoint; {fix}")
    mismatch = held_out_mismatch(train_manifest, manifest)
    if mismatch:
        raise UserError(f"--val-shards {location} does not fit the training shards ({mismatch}); {fix}")
    if check_files:
        bad = check_shard_files(location, manifest, verify)
        if bad:
            name, why = next(iter(bad.items()))
            raise UserError(f"--val-shards {location}: {len(bad)} shard(s) do not match its manifest ({name}: {why}); "
                            f"check it with `synth verify {location}` and rerun the same `synth generate`, or "
                            "pass --val-shards none")
    return ValSet(location, manifest, retry)


@dataclass
class RunInputs:
    """Everything a run reads, built and checked before its folder is touched."""

    manifest: Manifest              # of the shards trained on (skipped ones left out)
    skipped: dict[str, str]         # shard name -> why it was left out (--on-bad-shard skip)
    device: torch.device
    teacher: nn.Module | None       # None: stored logits
    student: nn.Module
    loader: ShardLoader
    evaluation: Evaluation          # the real evaluation data and the held-out split (rank 0's; none elsewhere)
    val_shards: str = NONE          # where the held-out split is (--val-shards resolved), or none


def prepare_inputs(config: TrainConfig, device: torch.device,
                   dist: distributed.DistInfo = distributed.DistInfo(), manifest: Manifest | None = None) -> RunInputs:
    """Read (unless given `manifest`) and check the shards, models, evaluation data and held-out split
    (UserError before any file is written). In a distributed run rank 0 checks the shard files and the
    others take its verdict; rank 0 alone evaluates."""
    manifest = read_manifest(config.shards) if manifest is None else manifest
    # how a failed transfer of a remote shard is retried (--shard-attempts, --shard-retry-seconds, --shard-read-timeout)
    retry = Retry(config.shard_attempts, config.shard_retry_seconds, config.shard_read_timeout)
    val = open_val_set(config.val_shards, config.shards, manifest, config.verify_shards, check_files=dist.is_main,
                       retry=retry)
    if config.keep == "best-val" and val is None:
        raise UserError("--keep best-val ranks the epochs on a held-out synthetic split and there is none "
                        f"(--val-shards {config.val_shards}): pass --val-shards PATH, write one with `synth generate "
                        "--val-images N` (rerun on the same --out adds it), or use --keep last")
    bad = check_shard_files(config.shards, manifest, config.verify_shards) if dist.is_main else None
    if dist.enabled:
        bad = distributed.broadcast_object(bad)
    manifest, skipped = select_shards(config.shards, manifest, bad, config.on_bad_shard,
                                      _warn if dist.is_main else (lambda message: None))
    torch.manual_seed(config.seed)
    teacher = None if config.teacher_logits == "stored" else load_teacher(manifest, config.teacher_weights, device)
    student = to_memory_format(build_student(config.student, config.student_weights, manifest).to(device),
                               config.channels_last)
    check_models_fit(teacher, student, manifest, config.student, device)
    if dist.enabled:  # the same initial weights everywhere (DDP also broadcasts rank 0's); then own draws
        torch.manual_seed(config.seed + dist.rank)
    loader = ShardLoader(config.shards, manifest, config.batch_size_per_rank, config.workers, config.aug, config.seed,
                         rank=dist.rank, world_size=dist.world_size, skip_bad=config.on_bad_shard == "skip",
                         pin_memory=config.pin_memory and device.type == "cuda",
                         persistent_workers=config.persistent_workers, verify=config.verify_shards,
                         with_meta=config.teacher_view == "native", retry=retry)
    evaluation = Evaluation(device, config.workers, config.channels_last, config.verify_shards, config.eval_data,
                            val=val if dist.is_main else None)
    if config.eval_data and dist.is_main:  # an ImageFolder is decoded once here: a damaged image stops the run now
        evaluation.student_data = real_dataset(config.eval_data, student.input_spec, train=False,
                                               root=config.data_root, workers=config.workers)
        if teacher is not None:
            evaluation.teacher_data = evaluation.student_data if teacher.input_spec == student.input_spec else (
                real_dataset(config.eval_data, teacher.input_spec, train=False, root=config.data_root, check=False,
                             workers=config.workers))  # streamed: checked above; cached at the teacher's size: decoded here
    return RunInputs(manifest, skipped, device, teacher, student, loader, evaluation,
                     val.location if val is not None else NONE)


def _warn(message: str) -> None:
    tqdm.write(message, file=sys.stderr)

