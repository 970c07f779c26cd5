"""How long `synth generate` takes, measured on its first steps and projected to the whole run.

`synth generate --estimate` runs what the real command runs, briefly, on the chosen device: the method's own
training loop for a few steps after warm-up ones (on a temporary state folder), then shard batches through
the real writer pool (synthesis, the teacher's logits, encoding; nothing is written). The projection:

    synthesis  = startup (interpreter, imports, teacher, method, device) + warm-up steps as measured
                 + remaining steps x s/step
    writing    = warm-up batch as measured + remaining images x s/image, where a batch costs the device's
                 part and the pool's part one after the other without writers, the larger of the two with
                 writers (they encode batch b while the device works on b + 1)
    disk bytes = bytes of the timed batches' tar members per image x images

A plain `synth generate` prints the same projection from its own first steps (`Projection`): the training
line once its first steps are timed, the whole line once its first shard is written.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

ESTIMATE_NAME = "estimate.json"   # written by --estimate into --out (a later run into that folder keeps it)
LONG_STEP_S = 20.0    # a first step (or batch) longer than this is the only warm-up one
WARMUP = 2            # warm-up steps otherwise (the first ones allocate memory, pick kernels, compile)
ENOUGH_S = 5.0        # time at least this long once warm ...
ENOUGH_STEPS = 3      # ... and at least this many steps,
MAX_STEPS = 50        # or this many,
LONG_ENOUGH_S = 30.0  # or this long with one step
# CPU teachers at least this large (input side, px) get a warning at start: ImageNet-size steps take minutes
LARGE_INPUT = 128


def process_seconds() -> float:
    """Seconds since this process started (interpreter start-up and imports included; Linux's /proc), else 0."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return max(0.0, float(f.read().split()[0]) - started)
    except (OSError, ValueError, IndexError):
        return 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Timestamps of consecutive steps (or batches): warm-up ones, then timed ones until `enough`."""

    def __init__(self, device: torch.device, total: int):
        self.device, self.total = device, total
        self.times = [time.perf_counter()]

    def restart(self) -> None:
        self.times = [time.perf_counter()]

    def tick(self) -> bool:
        """One more step done; True when enough are timed (or all `total` are done)."""
        sync(self.device)
        self.times.append(time.perf_counter())
        return self.enough

    @property
    def done(self) -> int:
        return len(self.times) - 1

    @property
    def warmup(self) -> int:
        if self.done and self.times[1] - self.times[0] > LONG_STEP_S:
            return 1
        return min(WARMUP, max(0, self.total - 1))

    @property
    def timed(self) -> int:
        return max(0, self.done - self.warmup)

    @property
    def timed_s(self) -> float:
        return self.times[-1] - self.times[self.warmup] if self.timed else 0.0

    @property
    def enough(self) -> bool:
        if self.done >= self.total:
            return True
        s = self.timed_s
        return self.timed >= 1 and ((self.timed >= ENOUGH_STEPS and s >= ENOUGH_S) or self.timed >= MAX_STEPS
                                    or s >= LONG_ENOUGH_S)

    @property
    def per_step(self) -> float:
        """Seconds per step once warm (the warm-up steps' mean when none is timed yet)."""
        if self.timed:
            return self.timed_s / self.timed
        return (self.times[-1] - self.times[0]) / max(1, self.done)

    @property
    def warmup_s(self) -> float:
        return self.times[min(self.warmup, self.done)] - self.times[0]

    def project(self, total: int) -> float:
        """Seconds for `total` steps: the warm-up as measured, the rest at the warm rate."""
        warm = min(self.warmup, self.done, total)
        return (self.times[warm] - self.times[0]) + (total - warm) * self.per_step


@dataclass
class Estimate:
    """The projection of one `synth generate` (seconds, bytes) and what it was measured on."""

    device: str
    threads: int
    method: str
    num_images: int            # every image the run writes: --num-images and the held-out split
    val_images: int            # of which the held-out split's
    training_steps: int        # steps of the method's training (each trains every generator); 0: none
    warmup_steps: int
    timed_steps: int
    step_s: float              # seconds per training step once warm
    write_batch_size: int
    write_workers: int
    timed_batches: int
    batch_device_s: float      # a warm batch: synthesis + teacher logits + copy to the host
    batch_encode_s: float      # a warm batch: encoding and tar members in the pool
    startup_s: float           # from the start of the process (CLI; else of `generate`) to the first training step
    synthesis_s: float         # startup + training
    writing_s: float
    total_s: float
    images_per_s: float        # num_images / total_s
    disk_bytes: int
    measured_s: float          # what the estimate itself took

    def summary(self) -> str:
        train = (f"{self.training_steps} training steps at {self.step_s:.3g} s after {self.warmup_steps} warm-up "
                 f"(timed {self.timed_steps})" if self.training_steps else "no training stage")
        batch = (f"{self.batch_device_s:.3g} s device + {self.batch_encode_s:.3g} s encoding per batch of "
                 f"{self.write_batch_size}, {self.write_workers} writer(s)")
        held_out = f" ({self.val_images:,} of them held out)" if self.val_images else ""
        return (f"estimate for {self.num_images:,} images{held_out} ({self.method} on {self.device}, "
                f"{self.threads} thread(s)): "
                f"synthesis {hours(self.synthesis_s)} ({train}), writing {hours(self.writing_s)} ({batch}), "
                f"total {hours(self.total_s)}, {self.images_per_s:.3g} images/s, {disk(self.disk_bytes)} on disk")


def hours(seconds: float) -> str:
    """'0.52 h (31 min)', '12.3 h (0.51 days)', '0.004 h (15 s)'."""
    if seconds >= 86_400:
        return f"{seconds / 3600:.3g} h ({seconds / 86_400:.2g} days)"
    if seconds >= 120:
        return f"{seconds / 3600:.3g} h ({seconds / 60:.0f} min)"
    return f"{seconds / 3600:.2g} h ({seconds:.0f} s)"


def disk(nbytes: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.0f} bytes"


def time_training(method, fit: Callable[[object], None], device: torch.device) -> Clock:
    """The first steps of `method`'s training, on a copy that stops once they are timed: `fit(copy)` runs its
    training (on a temporary state folder) and leaves the copy ready to synthesise."""
    steps = method.training_steps()
    clock = Clock(device, steps)
    timing = method.with_training_steps(steps)
    timing.on_step = lambda done: clock.tick()
    clock.restart()
    fit(timing)
    return clock, timing


def time_writing(batches: Iterator, time_batch: Callable, device: torch.device, total_batches: int
                 ) -> tuple[Clock, float, float, int, int]:
    """Batches drawn from `batches` (the synthesis) and passed to `time_batch` (-> device s, encode s, bytes)
    until enough are timed: (clock over whole batches, warm device s, warm encode s, bytes, images)."""
    clock = Clock(device, total_batches)
    device_s, encode_s, nbytes, images = [], [], 0, 0
    for batch in batches:
        start = time.perf_counter()
        d, e, n = time_batch(batch)   # the batch was drawn (synthesised) when the clock last ticked
        drawn = start - clock.times[-1]
        device_s.append(drawn + d)
        encode_s.append(e)
        nbytes, images = nbytes + n, images + len(batch.keys)
        if clock.tick():
            break
    warm = slice(clock.warmup, None) if clock.timed else slice(None)
    return clock, _mean(device_s[warm]), _mean(encode_s[warm]), nbytes, images


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def project(*, device: torch.device, method, num_images: int, write_batch_size: int, workers: int,
            startup_s: float, val_images: int = 0, train: Clock | None, batch_device_s: float,
            batch_encode_s: float,
            write_clock: Clock, nbytes: int, images: int, measured_s: float) -> Estimate:
    """The Estimate from the measured steps and batches (see the module docstring); `num_images` counts every
    image written, `val_images` of them in the held-out split."""
    steps = method.training_steps()
    training_s = train.project(steps) if train is not None and steps else 0.0
    batch_s = max(batch_device_s, batch_encode_s) if workers else batch_device_s + batch_encode_s
    first = write_clock.times[min(write_clock.warmup, write_clock.done)] - write_clock.times[0]
    # images per timed batch: fewer than --write-batch-size where shards are smaller (a batch ends with its shard)
    per_batch = images / write_clock.done if images and write_clock.done else write_batch_size
    warm_images = min(write_clock.warmup, write_clock.done) * per_batch
    writing_s = first + max(0, num_images - warm_images) * batch_s / per_batch
    if not write_clock.timed:   # one batch only: it is the rate
        writing_s = num_images * (first or batch_s) / max(1, min(num_images, per_batch))
    synthesis_s = startup_s + training_s
    total = synthesis_s + writing_s
    return Estimate(device=str(device), threads=torch.get_num_threads(), method=method.name, num_images=num_images,
                    val_images=val_images, training_steps=steps, warmup_steps=train.warmup if train else 0,
                    timed_steps=train.timed if train else 0, step_s=train.per_step if train and steps else 0.0,
                    write_batch_size=write_batch_size, write_workers=workers, timed_batches=write_clock.done,
                    batch_device_s=batch_device_s, batch_encode_s=batch_encode_s, startup_s=startup_s,
                    synthesis_s=synthesis_s, writing_s=writing_s, total_s=total, images_per_s=num_images / total,
                    disk_bytes=int(nbytes / max(1, images) * num_images), measured_s=measured_s)


class Projection:
    """What a plain `synth generate` says about its own duration: after its first training steps, the
    training's end; after its first shard, the whole run's (the same quantities as `--estimate`)."""

    def __init__(self, device: torch.device, num_images: int, started: float, enabled: bool,
                 say: Callable[[str], None] | None = None, later_images: int = 0):
        """`num_images`: the shards it watches; `later_images`: written after them (the held-out split)."""
        self.device, self.started, self.enabled = device, started, enabled
        self.num_images, self.later_images = num_images + later_images, later_images
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.train: Clock | None = None
        self.batches: Clock | None = None
        self._told_training = self._told_writing = False
        self._steps = self._drawn_images = self._last_batch = 0

    def watch_training(self, method) -> None:
        """Time `method`'s training steps from now (its `on_step`)."""
        self._steps = method.training_steps()
        self.train = Clock(self.device, self._steps)
        method.on_step = self._step

    def _step(self, done: int) -> bool:
        if self.enabled and not self._told_training and self.train.tick() and done < self._steps:
            self._told_training = True
            left = (self._steps - done) * self.train.per_step
            self.say(f"projection: training {self._steps} steps at {self.train.per_step:.3g} s per step (after "
                     f"{self.train.warmup} warm-up): {hours(left)} more, then writing {self.num_images:,} images "
                     "(projected once the first shard is written; `synth generate --estimate` projects both "
                     "before a run)")
        return False

    def watch_batches(self, batches: Iterator) -> Iterator:
        """`batches` as drawn by the writer: the time between draws is the writing rate (pipelined). Once the
        projection is told, the batches pass untouched."""
        for batch in batches:
            if not self._told_writing:
                if self.batches is None:
                    self.batches = Clock(self.device, 1 << 30)
                else:
                    self.batches.tick()
                    self._drawn_images += self._last_batch
                self._last_batch = len(batch.keys)
            yield batch

    def shard_done(self, size: int, samples: int, images_left: int) -> None:
        """A shard of `size` bytes and `samples` images is written; `images_left` are still to write."""
        if not self.enabled or self._told_writing or self.batches is None or not images_left:
            return
        self._told_writing = True
        images_left += self.later_images
        clock = self.batches
        per_batch = self._drawn_images / clock.done if clock.done else 0   # a batch ends with its shard
        per_image = clock.per_step / max(1, per_batch) if clock.done else 0.0
        elapsed = time.perf_counter() - self.started
        left = images_left * per_image
        total = elapsed + left
        self.say(f"projection: {images_left:,} images left to write at {1 / per_image if per_image else 0:.3g} "
                 f"images/s: {hours(left)} more, total {hours(total)}, {self.num_images / total:.3g} images/s, "
                 f"{disk(size / max(1, samples) * self.num_images)} on disk")
