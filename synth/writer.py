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
from typing import Callable, Iterable

import torch

from common.shards import LOSSY_FORMATS, ShardFile, ShardRecord, encode_images, encode_segment


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
        """Batches in flight per stage: enough to keep every worker busy while the device works."""
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


def write_shard(path: Path, batches: Iterable[PixelBatch], logits_of: Callable[[torch.Tensor], torch.Tensor],
                relabel: bool, image_format: str, pool: WriterPool) -> ShardRecord:
    """Write one shard from `batches` (atomically, hashed while written). `logits_of(pixels)` runs the
    teacher on 8-bit (B, C, H, W) pixels; `relabel`: a sample's class is the teacher's argmax."""
    lossy = image_format in LOSSY_FORMATS
    encoding: deque = deque()   # lossy formats: (batch, future of (image bytes, decoded pixels))
    segments: deque = deque()   # (future of segment bytes, samples)

    def finish(batch: PixelBatch, pixels: torch.Tensor, images) -> None:
        logits = logits_of(pixels)
        labels = logits.argmax(1) if relabel else batch.labels
        segments.append((pool.submit(encode_segment, batch.keys, images, labels.tolist(),
                                     logits.to(torch.float16).cpu().numpy(), batch.metas, image_format),
                         len(batch.keys)))

    def decoded(batch: PixelBatch, future: Future) -> None:
        images, pixels = future.result()
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(batch.pixels.device)
        finish(batch, pixels, images)

    with ShardFile(path) as shard:
        for batch in batches:
            host = batch.pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
            if lossy:
                encoding.append((batch, pool.submit(encode_images, host, image_format)))
                while len(encoding) > pool.depth:
                    decoded(*encoding.popleft())
            else:
                finish(batch, batch.pixels, host)
            while len(segments) > pool.depth:
                future, count = segments.popleft()
                shard.write(future.result(), count)
        while encoding:
            decoded(*encoding.popleft())
        while segments:
            future, count = segments.popleft()
            shard.write(future.result(), count)
    return shard.record


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

