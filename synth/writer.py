"""Shard writing for `synth generate`: the device synthesises each batch and computes the teacher's
logits while a pool of writer processes encodes the images and builds the tar bytes, so that writing
runs at the speed of the device work.

    main process (device)                          writer processes (numpy + Pillow, no torch)
    batch b: synthesise, 8-bit pixels  ----------> encode images (+ decode them, for JPEG)
             teacher logits on what a   <---------
             reader decodes             ---------> tar members of the batch (common.shards.encode_segment)
    write the segments in order, hashing <--------

Bytes do not depend on the pool size: the same functions build the same segments in the same order
(`workers=0` runs them in the main process). Lossless formats (PNG, npy) decode to the 8-bit pixels
themselves, so their logits are computed on those at once; for JPEG the teacher sees the decoded JPEG.
Either way the teacher gets the batch laid out as a reader lays out decoded images (`as_read`), so a
reader that batches them the same way gets the stored logits bit for bit.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from dfkd.common.shards import LOSSY_FORMATS, ShardFile, ShardRecord, encode_images, encode_segment


@dataclass
class PixelBatch:
    """One batch as synthesised: sample keys, 8-bit pixels (on the device, (B, C, H, W)), requested labels,
    per-sample metadata."""

    keys: list[str]
    pixels: torch.Tensor
    labels: torch.Tensor
    metas: list[dict]


class WriterPool:
    """Processes that encode (`workers` > 0), or the calling process itself (`workers` = 0)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = None
        if workers > 0:
            # fork, as torch's DataLoader workers: the children only run numpy and Pillow (never CUDA), and a
            # script that calls `generate` needs no `if __name__ == "__main__"` guard (spawn would rerun it)
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent,
                                             initargs=(os.getpid(),))

    def submit(self, fn: Callable, *args) -> Future:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    @property
    def depth(self) -> int:
        """Chunks in flight: two per writer, so every writer has the next one queued while the device works."""
        return max(1, 2 * self.workers)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "WriterPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _die_with_parent(parent: int) -> None:
    """In a writer process: exit as soon as the process that started it is gone (a killed `synth generate`
    must not leave writers behind, waiting on its queue forever)."""
    with contextlib.suppress(OSError, AttributeError):  # Linux: the kernel sends SIGKILL when the parent dies
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:   # elsewhere: poll
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


@dataclass
class ShardJob:
    """One shard to write: its final path and its batches (in sample order)."""

    path: Path
    batches: Iterable[PixelBatch]


def write_shards(jobs: Iterable[ShardJob], logits_of: Callable[[torch.Tensor], torch.Tensor], relabel: bool,
                 image_format: str, pool: WriterPool) -> Iterator[ShardRecord]:
    """Write the shards of `jobs` in order, each atomically and hashed while written, yielding each one's
    record once it has its final name. The pipeline runs across shard boundaries (the device starts on the
    next shard while the writers finish the last batches of this one), and each batch is split into one
    chunk per writer. `logits_of(pixels)` runs the teacher on 8-bit (B, C, H, W) pixels (a whole batch at
    a time, so the logits do not depend on the pool); `relabel`: a sample's class is the teacher's argmax.

    A pipeline of small stages, each pulling from the one before (as webdataset's):
        _host_batches   the jobs' batches, copied to the host, each job followed by its end
        _as_stored      the pixels a reader decodes (lossy formats: encoded and decoded in the pool, two
                        batches ahead) and the stored images
        _segments       the teacher's logits and labels; each chunk's tar bytes built in the pool
        _write          the chunks appended in order (pool.depth in flight), each shard closed at its end
    """
    batches = _host_batches(jobs)
    stored = _as_stored(batches, image_format, pool)
    segments = _segments(stored, logits_of, relabel, image_format, pool)
    return _write(segments, pool.depth)


@dataclass
class _Stored:
    """A batch as stored: the pixels a reader decodes (as it batches them) and the images to store (encoded
    bytes for a lossy format, else the 8-bit (B, H, W, C) array)."""

    job: ShardJob
    batch: PixelBatch
    pixels: torch.Tensor
    images: object


@dataclass
class _End:
    """A job's last batch has passed: its shard is complete once what came before is written."""

    job: ShardJob


def _chunks(n: int, pool: WriterPool) -> list[slice]:
    """A batch of `n` split into one slice per writer."""
    size = -(-n // max(1, min(pool.workers, n)))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _host_batches(jobs: Iterable[ShardJob]) -> Iterator[tuple[ShardJob, PixelBatch, np.ndarray] | _End]:
    """Each job's batches with their pixels on the host as (B, H, W, C), then the job's end."""
    for job in jobs:
        for batch in job.batches:
            yield job, batch, batch.pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        yield _End(job)


def _as_stored(items: Iterable, image_format: str, pool: WriterPool) -> Iterator[_Stored | _End]:
    """Lossless formats (PNG, npy) store the pixels themselves; lossy ones (JPEG) are encoded in the pool and
    decoded there too, two batches kept in flight, and a job's batches all pass before its end."""
    lossy = image_format in LOSSY_FORMATS
    encoding: deque = deque()   # (job, batch, futures of (image bytes, decoded pixels) per chunk)

    def decoded(job: ShardJob, batch: PixelBatch, futures: list[Future]) -> _Stored:
        parts = [f.result() for f in futures]
        pixels = as_read(np.concatenate([p for _, p in parts]), batch.pixels.device)
        return _Stored(job, batch, pixels, [data for images, _ in parts for data in images])

    for item in items:
        if isinstance(item, _End):
            while encoding:
                yield decoded(*encoding.popleft())
            yield item
            continue
        job, batch, host = item
        if not lossy:  # the stored pixels are these, batched as a reader batches them
            yield _Stored(job, batch, as_read(host, batch.pixels.device), host)
            continue
        encoding.append((job, batch, [pool.submit(encode_images, host[c], image_format)
                                      for c in _chunks(len(host), pool)]))
        while len(encoding) > 2:
            yield decoded(*encoding.popleft())


def _segments(items: Iterable[_Stored | _End], logits_of: Callable[[torch.Tensor], torch.Tensor], relabel: bool,
              image_format: str, pool: WriterPool) -> Iterator[tuple[ShardJob, Future | None, int]]:
    """(job, future of a chunk's tar bytes, its samples) per chunk, all of a batch's submitted at once;
    (job, None, 0) at a job's end."""
    for item in items:
        if isinstance(item, _End):
            yield item.job, None, 0
            continue
        batch, images = item.batch, item.images
        logits = logits_of(item.pixels)
        labels = (logits.argmax(1) if relabel else batch.labels).tolist()
        logits = logits.to(torch.float16).cpu().numpy()
        futures = [(pool.submit(encode_segment, batch.keys[c], images[c], labels[c], logits[c], batch.metas[c],
                                image_format), c.stop - c.start) for c in _chunks(len(batch.keys), pool)]
        for future, count in futures:
            yield item.job, future, count


def _write(segments: Iterable[tuple[ShardJob, Future | None, int]], depth: int) -> Iterator[ShardRecord]:
    """Append each chunk to its shard in order, keeping `depth` chunks in flight; at a job's end fsync,
    rename and yield the shard's record. A stop (an error, or the caller stopped reading) removes the
    unfinished shard's temp file."""
    in_flight: deque = deque()
    shard: ShardFile | None = None   # the shard being written (at most one)

    def write_oldest() -> ShardRecord | None:
        nonlocal shard
        job, future, count = in_flight.popleft()
        if future is None:   # the job's last chunk is written
            done, shard = shard, None
            done.__exit__(None, None, None)
            return done.record
        if shard is None:
            shard = ShardFile(job.path).__enter__()
        shard.write(future.result(), count)
        return None

    try:
        for segment in segments:
            in_flight.append(segment)
            while len(in_flight) > depth:
                record = write_oldest()
                if record is not None:
                    yield record
        while in_flight:
            record = write_oldest()
            if record is not None:
                yield record
    finally:
        if shard is not None:
            shard.__exit__(RuntimeError, RuntimeError("shard not finished"), None)


def as_read(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """Decoded 8-bit (B, H, W, C) images as a reader batches them, (B, C, H, W): stacked into a fresh
    array, `from_numpy`, `permute`, `contiguous` (distill's loader; webdataset and numpy readers get the
    same strides). The teacher's logits are computed on this tensor: on another layout of the same
    pixels (for one channel, a plain (B, C, H, W) tensor has other strides, and so has a view of it
    permuted to (B, H, W, C)) its convolutions may round differently, a float16 step in a few logits."""
    fresh = images.copy()  # C order with the strides np.stack gives, also along a dimension of size 1
    return torch.from_numpy(fresh).permute(0, 3, 1, 2).contiguous().to(device)


def time_batch(batch: PixelBatch, logits_of: Callable[[torch.Tensor], torch.Tensor], relabel: bool,
               image_format: str, pool: WriterPool) -> tuple[float, float, int]:
    """One batch through `write_shards`' own stages, timed apart (for `synth generate --estimate`): (seconds of
    the device's part: the copy to the host, the teacher's logits, for lossless formats the reader's layout;
    seconds of the pool's part: JPEG encoding and decoding, the tar members of every chunk; bytes of those
    members). Nothing is written. The caller times the synthesis (drawing `batch`)."""
    job = ShardJob(Path(), [batch])
    start = time.perf_counter()
    hosted = list(_host_batches([job]))
    device_s = time.perf_counter() - start
    start = time.perf_counter()
    stored = list(_as_stored(hosted, image_format, pool))
    if image_format in LOSSY_FORMATS:   # encoded and decoded in the pool
        encode_s = time.perf_counter() - start
    else:                               # the reader's layout of the pixels
        encode_s, device_s = 0.0, device_s + time.perf_counter() - start
    start = time.perf_counter()
    segments = list(_segments(stored, logits_of, relabel, image_format, pool))   # the logits; chunks submitted
    device_s += time.perf_counter() - start
    start = time.perf_counter()
    nbytes = sum(len(future.result()) for _, future, _ in segments if future is not None)
    return device_s, encode_s + time.perf_counter() - start, nbytes


def write_shard(path: Path, batches: Iterable[PixelBatch], logits_of: Callable[[torch.Tensor], torch.Tensor],
                relabel: bool, image_format: str, pool: WriterPool) -> ShardRecord:
    """Write one shard (see `write_shards`)."""
    (record,) = write_shards([ShardJob(path, batches)], logits_of, relabel, image_format, pool)
    return record


def default_workers(cores: int, device: torch.device) -> int:
    """Writer processes when not given, at most 16: on a GPU, the cores this process may use less one for
    the main process (which drives the device); on the CPU, the cores torch's threads leave free (none on
    this 2-core machine at 2 threads: measured, a writer there slows the teacher's threads more than it
    saves; see README, "Synthesis speed")."""
    if device.type == "cuda":
        return max(0, min(16, cores - 1))
    return max(0, min(16, cores - torch.get_num_threads()))


def pixels_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> 8-bit pixels, as stored."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)

