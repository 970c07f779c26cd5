"""Stage-two throughput on the machine at hand: how close the shard pipeline gets to training from memory,
what stored teacher logits save, and what decoding costs per worker.

    bash pipelines/bench_throughput.sh                  # sets up .venv, then runs this file
    python pipelines/bench_throughput.py --out runs/bench_throughput [--only resnet18@112] [--workers 2]

Training (student images/s; every mode runs the trainer's own step, `distill.train.train_one_epoch`,
for one full epoch over the same shards, worker start-up included; the modes take turns, --repeats
times, and each reports its median, which a busy machine disturbs less than a best or a mean):
  (a) memory   the step fed from batches already decoded and augmented in memory: no input cost at all
  (b) shards   the step fed by `distill.data.ShardLoader` from npy shards (read, decode, shuffle,
               augment in --workers DataLoader workers), the teacher run online on every batch
  (c) stored   as (b), but KD against the logits stored in the shards: no teacher, no augmentation
for lenet5 -> lenet5_half at 28 px (1 channel) and resnet50 -> resnet18 at 64 and 112 px; teachers and
students have random weights (speed does not depend on them), shards hold smooth random images.

Decoding (images/s of one worker, i.e. one process at one thread doing a worker's whole job: read the
tar, decode, shuffle, batch, augment with crop-flip) for PNG, JPEG and raw .npy at 32, 64 and 224 px.

Results: a markdown table on stdout and in <out>/results.md, the numbers in <out>/results.csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    student: str
    teacher: str
    size: int
    channels: int
    batch: int
    images: int      # one epoch
    shard_size: int
    aug: str
    mixup: float
    threads: int     # trainer threads; 0 = all usable cores
    amp: str = "none"
    channels_last: bool = False


# ---- the cases and the settings that were measured (README) -------------------------------------
# One trainer thread: with 2 cores, the trainer gets one and the DataLoader worker the other; two
# OpenMP threads on a shared machine collapse whenever another process takes one of the cores.
CASES = [
    Case("lenet5_half", "lenet5", 28, 1, batch=128, images=32_000, shard_size=4_000, aug="translate", mixup=1.0,
         threads=1),
    Case("resnet18", "resnet50", 64, 3, batch=64, images=1_024, shard_size=128, aug="crop-flip", mixup=0.0,
         threads=1, amp="bf16", channels_last=True),
    Case("resnet18", "resnet50", 112, 3, batch=32, images=384, shard_size=48, aug="crop-flip", mixup=0.0,
         threads=1, amp="bf16", channels_last=True),
]
DECODE_SIZES = {32: 4_000, 64: 2_000, 224: 400}  # px -> images decoded
DECODE_FORMATS = ("png", "jpg", "npy")


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def smooth_images(rng: np.random.Generator, n: int, size: int, channels: int) -> np.ndarray:
    """uint8 (n, size, size, channels): 8 x 8 noise upsampled bilinearly plus a little pixel noise, which
    compresses about as well as generator output does (pure noise would flatter npy and slow PNG)."""
    coarse = torch.from_numpy(rng.random((n, channels, 8, 8), dtype=np.float32))
    x = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x = x + 0.03 * torch.from_numpy(rng.standard_normal((n, channels, size, size), dtype=np.float32))
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def write_shards(folder: Path, n: int, shard_size: int, size: int, channels: int, image_format: str,
                 teacher: str, num_classes: int = 10) -> Path:
    """A complete shard folder of n smooth random images with random labels and logits."""
    from dfkd.common.models import InputSpec, IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN, MNIST_STD
    from dfkd.common.shards import (Sample, TeacherRecord, build_manifest, read_manifest, sample_key, shard_name,
                                    write_manifest, write_shard)

    if (folder / "manifest.json").is_file() and read_manifest(folder, require_complete=False).complete:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(size * 10 + channels)
    mean, std = (MNIST_MEAN, MNIST_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    spec = InputSpec(channels, size, mean, std, num_classes)
    config = {"bench": True, "n": n, "size": size, "format": image_format}
    record = TeacherRecord(arch=teacher, weights="none", weights_path=None, weights_sha256="0" * 64,
                           input_spec=spec.to_dict())
    manifest = build_manifest(record, method="bench", config=config, image_format=image_format, planned_samples=n,
                              shard_size=shard_size)
    for index, first in enumerate(range(0, n, shard_size)):
        count = min(shard_size, n - first)
        images = smooth_images(rng, count, size, channels)
        logits = rng.standard_normal((count, num_classes)).astype(np.float16)
        labels = rng.integers(0, num_classes, count)
        samples = (Sample(sample_key(first + i), images[i], int(labels[i]), logits[i]) for i in range(count))
        manifest.shards.append(write_shard(folder / shard_name(index), samples, image_format))
    manifest.complete = True
    write_manifest(folder, manifest)
    return folder


class MemoryLoader:
    """The ShardLoader interface over a few batches already in memory (cycled): training without input cost."""

    def __init__(self, batches: list, steps: int):
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int):
        return (self.batches[i % len(self.batches)] for i in range(self.steps))


def bench_training(case: Case, shards: Path, args, workdir: Path) -> dict:
    """img/s of (a) memory, (b) shards + online teacher, (c) shards + stored logits: median of args.repeats."""
    from dfkd.common.models import create_model
    from dfkd.common.shards import read_manifest
    from dfkd.distill.data import ShardLoader
    from dfkd.distill.engine import build_optimizer
    from dfkd.common.accel import grad_scaler, to_memory_format
    from dfkd.distill.throughput import wrap_student, wrap_teacher
    from dfkd.distill.config import TrainConfig
    from dfkd.distill.loop import train_one_epoch
    from dfkd.distill.nets import Models

    threads = args.threads or case.threads or usable_cores()
    amp = args.amp or case.amp
    channels_last = case.channels_last if args.channels_last is None else args.channels_last == "on"
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    manifest = read_manifest(shards)
    num_classes = manifest.num_classes
    student = create_model(case.student, num_classes=num_classes, in_chans=case.channels, input_size=case.size)
    teacher = create_model(case.teacher, num_classes=num_classes, in_chans=case.channels, input_size=case.size)
    student = to_memory_format(student, channels_last)
    teacher = to_memory_format(teacher.eval().requires_grad_(False), channels_last)
    optimizer = build_optimizer(student, "sgd", 0.01, 5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    base = dict(shards=str(shards), student=case.student, out=str(workdir), batch_size_per_rank=case.batch,
                workers=args.workers, progress=False, amp=amp, channels_last=channels_last,
                compile=args.compile, persistent_workers=False, epochs=1)
    online = TrainConfig(**base, aug=case.aug, mixup=case.mixup).resolved()
    stored = TrainConfig(**base, aug="none", mixup=0.0, teacher_logits="stored").resolved()
    models = Models(model=wrap_student(student, device, False, args.compile), student=student,
                    teacher=wrap_teacher(teacher, args.compile), teacher_spec=teacher.input_spec,
                    scaler=grad_scaler(amp, device), ema=None)
    stored_models = Models(model=models.model, student=student, teacher=None, teacher_spec=None,
                           scaler=models.scaler, ema=None)

    def loader(config):
        return ShardLoader(shards, manifest, case.batch, args.workers, config.aug, seed=0)

    shard_loader = loader(online)
    memory = MemoryLoader(list(_take(ShardLoader(shards, manifest, case.batch, 0, case.aug, seed=1).epoch(0), 4)),
                          len(shard_loader))
    modes = {"memory": (models, memory, online), "shards": (models, shard_loader, online),
             "stored": (stored_models, loader(stored), stored)}
    # warm-up: allocator, kernels (and compilation with --compile), a few steps of each model set
    for m, config in ((models, online), (stored_models, stored)):
        train_one_epoch(m, MemoryLoader(memory.batches, 3), optimizer, scheduler, config, 0, device)
    rates = {name: [] for name in modes}
    images = len(shard_loader) * case.batch
    for repeat in range(args.repeats):
        for name, (m, data, config) in modes.items():
            seconds = train_one_epoch(m, data, optimizer, scheduler, config, repeat + 1, device)["seconds"]
            rates[name].append(images / seconds)
            print(f"  {case.student} {case.size}px {name}: {images / seconds:.1f} img/s", flush=True)
    return {"threads": threads, "amp": amp, "channels_last": channels_last, "images": images,
            **{name: statistics.median(values) for name, values in rates.items()}}


def _take(iterator, n):
    for i, item in enumerate(iterator):
        if i == n:
            return
        yield item


def bench_decoding(fmt: str, size: int, n: int, workdir: Path) -> float:
    """img/s of one process doing one DataLoader worker's job over n images in `fmt` at `size` px."""
    from dfkd.common.shards import read_manifest
    from dfkd.distill.data import ShardLoader

    torch.set_num_threads(1)  # as in a DataLoader worker
    folder = write_shards(workdir / f"decode-{fmt}-{size}", n, n, size, 3, fmt, "resnet18")
    loader = ShardLoader(folder, read_manifest(folder), batch_size=50, workers=0, aug="crop-flip", seed=0,
                         shuffle_buffer=min(n, 2000))
    rates = []
    for epoch in range(3):
        start = time.perf_counter()
        count = sum(batch.images.shape[0] for batch in loader.epoch(epoch))
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_throughput", help="Shards (made once) and results.")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers for (b) and (c).")
    parser.add_argument("--threads", type=int, default=0, help="Trainer threads [default: per case, see CASES].")
    parser.add_argument("--repeats", type=int, default=3, help="Epochs per mode; the median counts.")
    parser.add_argument("--amp", default=None, choices=("none", "bf16"), help="[default: per case, see CASES]")
    parser.add_argument("--channels-last", default=None, choices=("on", "off"), help="[default: per case]")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--only", default=None, help="Only cases whose '<student>@<px>' contains this.")
    parser.add_argument("--results", default=None, metavar="FILE",
                        help="also write the tables, headed with date, machine, commit and command, into FILE")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()

    rows = []
    for case in CASES:
        if args.only and args.only not in f"{case.student}@{case.size}":
            continue
        shards = write_shards(out / f"shards-{case.student}-{case.size}", case.images, case.shard_size, case.size,
                              case.channels, "npy", case.teacher)
        print(f"{case.teacher} -> {case.student} at {case.size} px, batch {case.batch}:", flush=True)
        rows.append((case, bench_training(case, shards, args, out / "run")))
    decode = {}
    if not args.skip_decode:
        for size, n in DECODE_SIZES.items():
            for fmt in DECODE_FORMATS:
                decode[fmt, size] = bench_decoding(fmt, size, n, out)
                print(f"  decode {fmt} {size}px: {decode[fmt, size]:.0f} img/s", flush=True)
    load_after = os.getloadavg()
    write_results(out, args, rows, decode, load_before, load_after, time.perf_counter() - started)


def write_results(out: Path, args, rows, decode, load_before, load_after, seconds) -> None:
    settings = f"--workers {args.workers}, --repeats {args.repeats}, compile {args.compile}"
    lines = [f"Stage-two throughput, {usable_cores()} usable cores, torch {torch.__version__}; {settings}; "
             f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; {seconds / 60:.1f} min.", "",
             "| teacher -> student | px | batch | threads | amp, channels-last | (a) memory img/s | (b) shards img/s "
             "| (c) stored img/s | (b)/(a) | (c)/(a) | (c)/(b) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    table = []
    for case, r in rows:
        ratios = (r["shards"] / r["memory"], r["stored"] / r["memory"], r["stored"] / r["shards"])
        lines.append(f"| {case.teacher} -> {case.student} | {case.size} | {case.batch} | {r['threads']} | "
                     f"{r['amp']}, {'yes' if r['channels_last'] else 'no'} | "
                     f"{r['memory']:.0f} | {r['shards']:.0f} | {r['stored']:.0f} | "
                     + " | ".join(f"{v:.2f}" for v in ratios) + " |")
        table.append(["train", f"{case.teacher}->{case.student}", case.size, case.batch, r["threads"],
                      r["amp"], r["channels_last"],
                      f"{r['memory']:.1f}", f"{r['shards']:.1f}", f"{r['stored']:.1f}"] + [f"{v:.3f}" for v in ratios])
    if decode:
        sizes = sorted({size for _, size in decode})
        lines += ["", "Decode + shuffle + batch + crop-flip, img/s of one worker (one process, one thread):", "",
                  "| format | " + " | ".join(f"{s} px" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for fmt in DECODE_FORMATS:
            lines.append(f"| {fmt} | " + " | ".join(f"{decode[fmt, s]:.0f}" for s in sizes) + " |")
            table += [["decode", fmt, s, 50, 1, "none", False, f"{decode[fmt, s]:.1f}"] for s in sizes]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    if args.results:
        from results_header import write_results_file
        write_results_file(args.results, text, title="Stage-two throughput")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "what", "px", "batch", "threads", "amp", "channels_last", "memory_or_decode_img_s",
                         "shards_img_s",
                         "stored_img_s", "shards_over_memory", "stored_over_memory", "stored_over_shards"])
        writer.writerows(table)
    print("\n" + text)


if __name__ == "__main__":
    main()
