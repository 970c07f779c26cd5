"""Streaming input pipeline over synth's WebDataset shards (the augmentations themselves: distill/augment.py).

Stages, run inside each DataLoader worker, each a small iterable over the one before (webdataset's style):

  EpochShardList      the manifest's shard list, shuffled with (seed, epoch, round): the same order on
                      every rank; then split by rank, then by worker; repeated round after round, so a
                      worker never runs dry and an epoch never runs short (every rank gets the same
                      number of batches: no rank waits at the end of an epoch for one that ran out)
  ShardSamples        the raw bytes of each sample (common.shards' strict, fast tar reader), counted
                      against the manifest
  EpochShuffle        a sample shuffle buffer on the raw (still compressed) bytes
  Decoder             common.shards.decode_sample, checked against the manifest
  batched             whole batches stacked inside the worker: pixels uint8 B x C x H x W as stored,
                      labels, logits float32
  Augmentation        student-side augmentation (distill/augment.py) on the uint8 batch, each image its own draw

  to_arrays           the batch as numpy arrays, for the trip to the trainer process

Batches cross from the worker to the trainer as numpy arrays, which pickle by value through the
worker's queue: as tensors, each would take its own shared-memory segment and file-descriptor pass,
about 4x the trainer's CPU per batch at 28 px (2.3 vs 0.6 ms per batch of 128 here). Images stay
uint8 (a quarter of the bytes of float32, and the crop is 3-4x faster on them);
`distill.throughput.batch_to` makes them float in [0, 1] on the device.

The loader (batch_size=None) cuts this endless stream after `steps_per_epoch` batches, counted on the
loader: `with_epoch` on the dataset would count per worker. The epoch number lives in shared memory,
so persistent workers pick up the next epoch's shard order too.
"""
from __future__ import annotations

import multiprocessing
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from dfkd.common.errors import UserError
from dfkd.common.input_spec import InputSpec
from dfkd.common.remote import Retry, StreamError, fetch_verified, is_remote
from dfkd.common.shards import (Manifest, Sample, ShardFormatError, decode_sample, group_samples, iter_raw_samples,
                                shard_paths)

from .augment import augmentation
from .datasets import ImageArrays

SHUFFLE_BUFFER = 2000  # samples held per worker; raw bytes, so cheap
SHUFFLE_INITIAL = 500  # samples gathered before the first one leaves the buffer


class Batch(NamedTuple):
    """What the pipeline yields: one training batch."""

    images: torch.Tensor  # uint8 (B, C, H, W) from the shards (float in [0, 1] also accepted), augmented
    labels: torch.Tensor  # int64 (B,), the class each image was synthesised for
    logits: torch.Tensor  # float32 (B, K), the teacher's logits of the stored (un-augmented) image
    index: torch.Tensor | None = None  # int64 (B,), each sample's index from its key (-1 if not sample-N)
    resolution: torch.Tensor | None = None  # int64 (B,), each image's native size from its metadata (0: none
    #                                         recorded); only read for --teacher-view native


# --------------------------------------------------------------------------- pipeline stages
@dataclass(frozen=True)
class Augmentation:
    """The pipeline stage of student-side augmentation: a batch's images (B, C, H, W), uint8 pixels (the
    pipeline's) or floats in [0, 1], augmented by name (distill/augment.py's AUGMENTATIONS)."""

    name: str
    size: int

    def __post_init__(self):
        augmentation(self.name, self.size)  # UserError for an unknown name

    def __call__(self, batch: Batch) -> Batch:
        augment = augmentation(self.name, self.size)
        return batch if augment is None else batch._replace(images=augment(batch.images))


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class EpochShardList(IterableDataset):
    """Endless stream of {"url": shard} for this rank and DataLoader worker.

    Every round shuffles the full list with (seed, epoch, round), identical on every rank, and only
    then takes this rank's share, then this worker's share of it.
    """

    def __init__(self, urls: Sequence[str], seed: int, rank: int, world_size: int, reseed_workers: bool = False):
        super().__init__()
        self.urls, self.seed, self.rank, self.world_size = list(urls), seed, rank, world_size
        self.reseed_workers = reseed_workers
        self._epoch = multiprocessing.RawValue("q", 0)  # shared with (persistent) worker processes

    @property
    def epoch(self) -> int:
        return self._epoch.value

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.value = value

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker_info()
        if self.reseed_workers and torch.utils.data.get_worker_info() is not None:
            # persistent workers keep their RNG across epochs: seed the augmentation draws per epoch,
            # so that a resumed run repeats them
            torch.manual_seed(random.Random(f"aug/{self.seed}/{self.epoch}/{self.rank}/{worker}").getrandbits(63))
        round_ = 0
        while True:
            order = list(self.urls)
            random.Random(f"shards/{self.seed}/{self.epoch}/{round_}").shuffle(order)
            for url in order[self.rank::self.world_size][worker::num_workers]:
                yield {"url": url}
            round_ += 1


class EpochShuffle:
    """Sample shuffle buffer, seeded by (seed, epoch, rank, worker): reproducible, distinct per worker."""

    def __init__(self, shard_list: EpochShardList, bufsize: int = SHUFFLE_BUFFER, initial: int = SHUFFLE_INITIAL):
        self.shard_list, self.bufsize, self.initial = shard_list, bufsize, initial

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        s = self.shard_list
        rng = random.Random(f"samples/{s.seed}/{s.epoch}/{s.rank}/{_worker_info()[0]}")
        return wds.shuffle(self.bufsize, self.initial, rng=rng)(samples)


def warn_skipped(what: str, reason: str) -> None:
    """One line on stderr for data left out under --on-bad-shard skip (from whichever process reads it)."""
    print(f"warning: skipping {what} (--on-bad-shard skip): {reason}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Decoder:
    """Raw sample fields -> common.shards.Sample, checked against the manifest's image size and classes
    (an image larger than that is refused before it is decoded). `skip_bad`: a bad sample is reported
    and becomes None (filtered out) instead of stopping the run."""

    spec: InputSpec
    skip_bad: bool = False
    with_meta: bool = False  # training reads the metadata only for --teacher-view native

    def __call__(self, fields: dict) -> Sample | None:
        try:
            sample = decode_sample(fields, max_pixels=self.spec.size * self.spec.size, with_meta=self.with_meta)
            expected = (self.spec.size, self.spec.size, self.spec.channels)
            if sample.image.shape != expected or sample.logits.shape != (self.spec.num_classes,):
                raise ShardFormatError(f"sample {sample.key} has a {sample.image.shape} image and "
                                       f"{sample.logits.shape[0]} logits; the manifest says {expected} and "
                                       f"{self.spec.num_classes}")
        except ShardFormatError as e:
            where = Path(fields.get("__url__", "?")).name
            if self.skip_bad:
                warn_skipped(f"a sample of {where}", str(e))
                return None
            raise ShardFormatError(f"{where}: {e}") from None
        return sample


def is_sample(sample: Sample | None) -> bool:
    return sample is not None


def key_index(key: str) -> int:
    """The sample index in a `sample-00001234` key (common.shards.sample_key), -1 for other keys."""
    head, _, digits = key.partition("-")
    return int(digits) if head == "sample" and digits.isdigit() else -1


def collate(samples: list[Sample]) -> Batch:
    """Stack decoded samples (uint8 H x W x C images) into a Batch of uint8 (B, C, H, W) images."""
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2)
    logits = torch.from_numpy(np.stack([s.logits for s in samples]).astype(np.float32))
    recorded = [s.meta.get("resolution", 0) for s in samples]
    if not all(isinstance(r, int) and r >= 0 for r in recorded):
        raise ShardFormatError(f"sample {samples[0].key}'s batch: a metadata resolution is not a size in pixels "
                               f"({sorted(set(map(repr, recorded)))})")
    return Batch(images.contiguous(), torch.tensor([s.label for s in samples], dtype=torch.int64), logits,
                 torch.tensor([key_index(s.key) for s in samples], dtype=torch.int64),
                 torch.tensor(recorded, dtype=torch.int64) if any(recorded) else None)


def to_arrays(batch: Batch) -> tuple:
    """Worker side: the batch's tensors as numpy arrays (zero-copy), to be pickled by value."""
    return tuple(None if t is None else t.numpy() for t in batch)


def as_received(arrays: tuple) -> tuple:
    """The DataLoader's collate_fn: keep what the worker sent (its default would make tensors in the worker)."""
    return arrays


@dataclass(frozen=True)
class ShardSamples:
    """{"url": path} -> raw sample dicts of that shard. A shard that cannot be read, or that holds another
    number of samples than the manifest records, raises ShardFormatError naming it (no silent loss); with
    `skip_bad` the rest of it is skipped and reported on stderr instead, until every shard in a row fails."""

    expected: dict  # path -> sample count from the manifest
    skip_bad: bool = False
    records: dict | None = None  # remote url -> ShardRecord: streamed shards are checked before use
    verify: str = "full"         # of streamed shards: full (size + sha256), size, none
    retry: Retry = Retry()       # of streamed shards: a failed transfer is fetched again from its start

    def __call__(self, shards: Iterator[dict]) -> Iterator[dict]:
        failures_in_a_row = 0
        for shard in shards:
            try:
                yield from self._read(shard["url"])
                failures_in_a_row = 0
            except ShardFormatError as e:
                failures_in_a_row += 1
                if not self.skip_bad or failures_in_a_row > len(self.expected):
                    raise
                warn_skipped(f"the rest of {Path(shard['url']).name}", str(e))

    def _read(self, url: str) -> Iterator[dict]:
        count = 0
        try:
            for fields in (self._streamed(url) if is_remote(url) else iter_raw_samples(url)):
                count += 1
                yield fields
        except OSError as e:
            raise ShardFormatError(f"{Path(url).name} cannot be read ({e})") from None
        if count != self.expected[url]:
            raise ShardFormatError(f"{Path(url).name} holds {count} samples, the manifest says "
                                   f"{self.expected[url]}")

    def _streamed(self, url: str) -> Iterator[dict]:
        """Raw samples of a remote shard, fetched whole and checked against the manifest first."""
        record = self.records[url]
        try:
            spool = fetch_verified(url, record.sha256, record.size, self.verify, self.retry)
        except StreamError as e:
            raise ShardFormatError(f"{record.name} {e}; pass --on-bad-shard skip to train without it") from None
        with spool:
            yield from group_samples(spool, record.name, url)


# --------------------------------------------------------------------------- loader
class ShardLoader:
    """Batches from a shard folder, `steps_per_epoch` of them per `epoch(e)`, the same count on every rank.

    `epoch(e)` reseeds the shard order and sample shuffle with e. Workers are started per epoch, or
    once with `persistent_workers` (they read the epoch from shared memory and reseed their
    augmentation per epoch). `pin_memory` copies each batch to page-locked memory in the trainer process
    (for CUDA training). `with_meta`: each batch carries its images' native resolutions (Batch.resolution).
    """

    def __init__(self, folder: str | os.PathLike, manifest: Manifest, batch_size: int, workers: int = 2,
                 aug: str = "translate", seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = SHUFFLE_BUFFER, skip_bad: bool = False, pin_memory: bool = False,
                 persistent_workers: bool = False, verify: str = "full", with_meta: bool = False,
                 retry: Retry = Retry()):
        urls = shard_paths(folder, manifest)
        missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
        if missing:
            raise UserError(f"{len(missing)} of {len(urls)} shards listed in the manifest are missing "
                            f"(first: {missing[0]}); restore them or regenerate the shards (`synth verify` lists them)")
        readers = max(workers, 1) * world_size
        if len(urls) < readers:
            fix = (f"pass --workers {len(urls) // world_size}" if len(urls) >= world_size else
                   f"run at most {len(urls)} processes in all (torchrun --nnodes x --nproc_per_node)")
            raise UserError(f"{folder} has {len(urls)} shards but {max(workers, 1)} workers x {world_size} ranks "
                            f"need at least {readers} (one shard each, every epoch): {fix}, "
                            "or regenerate with a smaller --shard-size")
        self.steps_per_epoch = manifest.num_samples // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise UserError(f"{folder} holds {manifest.num_samples} samples, less than one batch of {batch_size} "
                            f"x {world_size} ranks: lower --batch-size-per-rank")
        persistent_workers = persistent_workers and workers > 0
        self.shard_list = EpochShardList(urls, seed, rank, world_size, reseed_workers=persistent_workers)
        spec = manifest.input_spec
        dataset = wds.DataPipeline(
            self.shard_list,
            ShardSamples({u: r.num_samples for u, r in zip(urls, manifest.shards)}, skip_bad,
                         {u: r for u, r in zip(urls, manifest.shards)}, verify, retry),
            EpochShuffle(self.shard_list, bufsize=shuffle_buffer, initial=min(SHUFFLE_INITIAL, shuffle_buffer)),
            wds.map(Decoder(spec, skip_bad, with_meta)),
            wds.select(is_sample),
            wds.batched(batch_size, collation_fn=collate, partial=False),
            wds.map(Augmentation(aug, spec.size)),
            wds.map(to_arrays),
        )
        self.pin_memory = pin_memory
        self.loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                    collate_fn=as_received, persistent_workers=persistent_workers
                                    ).with_epoch(self.steps_per_epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch(self, epoch: int) -> Iterator[Batch]:
        self.shard_list.epoch = epoch
        for arrays in self.loader:
            tensors = (None if a is None else torch.from_numpy(a) for a in arrays)
            yield Batch(*(t.pin_memory() if self.pin_memory and t is not None else t for t in tensors))


# --------------------------------------------------------------------------- real data
def real_batches(dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int = 0,
                 generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) batches of a real dataset; in-memory TensorDatasets are sliced directly (fast).
    Training order (shuffle=True) drops the last partial batch; ImageArrays' uint8 training batches get
    the dataset's `augment` before they are normalised."""
    if isinstance(dataset, ImageArrays):
        n = len(dataset)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if shuffle else n
        for start in range(0, stop, batch_size):
            yield dataset.batch(order[start:start + batch_size], augment=shuffle)
        return
    if isinstance(dataset, TensorDataset):
        n = len(dataset)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if shuffle else n
        for start in range(0, stop, batch_size):
            index = order[start:start + batch_size]
            yield tuple(t[index] for t in dataset.tensors)
        return
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                          drop_last=shuffle, generator=generator)
