"""`synth inspect`: look at a synthetic dataset instead of reading it.

Reads every shard (or the first `limit` samples) and writes into `out`:
  contact_sheet.png    one row per class, `per_class` random samples of it (seeded), pixels enlarged
  class_histogram.png  samples per class: the stored label and the teacher's argmax side by side
  summary.csv          per class: samples, share, how often the teacher's argmax is the label, mean
                       teacher confidence (max softmax) and entropy (nats), exact duplicates, pair distance
and, for shards written with `synth generate --select`, says from the manifest how many candidates the
selection drew and how many slots it filled with images the teacher assigns to another class.

Exact duplicates: samples with the same pixels as an earlier sample. Pair distance: the mean absolute
difference (pixels in [0, 1]) between two samples of the class, over all pairs of up to 128 random
samples shrunk to 16 x 16 grey; near 0 means mode collapse (a generator that ignores its noise draws
the same image again and again). MNIST's real training digits: about 0.13.

    report = inspect_dataset("shards/mnist", "shards/mnist/inspect")
    print(report.summary)
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dfkd.common.errors import UserError
from dfkd.common.fileio import make_folder
from dfkd.common.plots import bar_chart, image_grid
from dfkd.common.shards import Manifest, Sample, ShardFormatError, read_manifest, read_shard, shard_paths

from .select import summary_line

CONTACT_SHEET, HISTOGRAM, SUMMARY = "contact_sheet.png", "class_histogram.png", "summary.csv"
THUMBNAIL, PAIR_SAMPLES = 16, 128


@dataclass
class Scan:
    """Per-sample statistics gathered in one pass over the shards, plus a few images per class."""

    labels: list[np.ndarray] = field(default_factory=list)
    teacher: list[np.ndarray] = field(default_factory=list)       # argmax of the stored logits
    confidence: list[np.ndarray] = field(default_factory=list)    # max softmax
    entropy: list[np.ndarray] = field(default_factory=list)       # nats
    exact_dup: list[bool] = field(default_factory=list)
    examples: dict[int, list[np.ndarray]] = field(default_factory=dict)     # for the contact sheet
    thumbnails: dict[int, list[np.ndarray]] = field(default_factory=dict)   # for the pair distance
    skipped: list[str] = field(default_factory=list)              # damaged shards: "name: why"
    skipped_samples: int = 0                                      # what the manifest lists in those
    shards_read: int = 0                                          # shards opened (damaged ones included)


@dataclass
class InspectReport:
    summary: pd.DataFrame
    files: list[Path]
    skipped: list[str]           # damaged shards left out: "name: why"
    skipped_samples: int = 0     # samples the manifest lists in them
    shards_read: int = 0         # shards opened, the damaged ones included
    selection: str | None = None  # what --select kept (synth/select.py's summary_line); None: no selection

    def skipped_line(self, total_samples: int) -> str:
        """How much was left out, e.g. '1 of 2 shards (9 of 18 samples)'."""
        return (f"{len(self.skipped)} of {self.shards_read} shards ({self.skipped_samples} of {total_samples} "
                "samples)")


def softmax_stats(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(argmax, max probability, entropy in nats) of each row of logits (N, K)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    return p.argmax(axis=1), p.max(axis=1), entropy


def thumbnail(image: np.ndarray, size: int = THUMBNAIL) -> np.ndarray:
    """A uint8 (H, W, C) image as grey `size` x `size` floats in [0, 1]."""
    grey = Image.fromarray(image.mean(axis=2).astype(np.uint8)).resize((size, size), Image.BOX)
    return np.asarray(grey, dtype=np.float32) / 255


def mean_pair_distance(thumbnails: list[np.ndarray]) -> float:
    """Mean absolute pixel difference over all pairs of thumbnails (NaN for fewer than two)."""
    if len(thumbnails) < 2:
        return float("nan")
    flat = np.stack(thumbnails).reshape(len(thumbnails), -1)
    distances = np.abs(flat[:, None, :] - flat[None, :, :]).mean(axis=2)
    n = len(flat)
    return float(distances.sum() / (n * (n - 1)))


def scan_dataset(folder: str | Path, manifest: Manifest, per_class: int, limit: int | None, seed: int) -> Scan:
    """One pass over the shards in manifest order (damaged shards are skipped and listed)."""
    scan, rng = Scan(), random.Random(seed)
    seen_pixels: set[bytes] = set()
    counts: dict[int, int] = {}
    spec, total = manifest.input_spec, 0
    for path, record in zip(shard_paths(folder, manifest), manifest.shards):
        if limit is not None and total >= limit:
            break
        scan.shards_read += 1
        try:
            samples = _read_some(path, spec.size * spec.size, None if limit is None else limit - total)
        except (ShardFormatError, OSError) as e:
            scan.skipped.append(f"{record.name}: {e}")
            scan.skipped_samples += record.num_samples
            continue
        if not samples:
            continue
        total += len(samples)
        labels = np.array([s.label for s in samples])
        argmax, confidence, entropy = softmax_stats(np.stack([s.logits for s in samples]))
        scan.labels.append(labels)
        scan.teacher.append(argmax)
        scan.confidence.append(confidence)
        scan.entropy.append(entropy)
        for sample in samples:
            pixels = hashlib.blake2b(sample.image.tobytes(), digest_size=8).digest()
            scan.exact_dup.append(pixels in seen_pixels)
            seen_pixels.add(pixels)
            counts[sample.label] = counts.get(sample.label, 0) + 1
            _reservoir(scan.examples.setdefault(sample.label, []), sample.image, counts[sample.label], per_class, rng)
            _reservoir(scan.thumbnails.setdefault(sample.label, []), sample.image, counts[sample.label], PAIR_SAMPLES,
                       rng, thumbnail)
    return scan


def _read_some(path: str, max_pixels: int, limit: int | None) -> list[Sample]:
    samples = []
    for sample in read_shard(path, max_pixels=max_pixels):
        samples.append(sample)
        if limit is not None and len(samples) >= limit:
            break
    return samples


def _reservoir(kept: list, item, seen: int, size: int, rng: random.Random, transform=None) -> None:
    """Keep a uniform random sample of `size` items of a stream (reservoir sampling); `seen` counts the
    items so far, this one included; `transform` is applied to the items kept."""
    if len(kept) < size:
        kept.append(transform(item) if transform else item)
        return
    j = rng.randrange(seen)
    if j < size:
        kept[j] = transform(item) if transform else item


def class_summary(scan: Scan, num_classes: int) -> pd.DataFrame:
    """The per-class table (one row per class that occurs or should, plus `all`)."""
    frame = pd.DataFrame({
        "class": np.concatenate(scan.labels), "teacher": np.concatenate(scan.teacher),
        "confidence": np.concatenate(scan.confidence), "entropy": np.concatenate(scan.entropy),
        "exact_dup": scan.exact_dup})
    frame["agrees"] = frame["class"] == frame["teacher"]
    grouped = frame.groupby("class")
    table = pd.DataFrame({
        "samples": grouped.size(),
        "share_%": grouped.size() / len(frame) * 100,
        "teacher_agrees_%": grouped["agrees"].mean() * 100,
        "confidence": grouped["confidence"].mean(),
        "entropy": grouped["entropy"].mean(),
        "exact_dups": grouped["exact_dup"].sum(),
    }).reindex(range(num_classes), fill_value=0)
    table["pair_distance"] = [mean_pair_distance(scan.thumbnails.get(c, [])) for c in range(num_classes)]
    table.loc["all"] = [len(frame), 100.0, frame["agrees"].mean() * 100, frame["confidence"].mean(),
                        frame["entropy"].mean(), frame["exact_dup"].sum(), table["pair_distance"].mean()]
    table.index.name = "class"
    return table.astype({"samples": int, "exact_dups": int})


def inspect_dataset(folder: str | Path, out: str | Path | None = None, per_class: int = 10, max_classes: int = 20,
                    limit: int | None = None, seed: int = 0) -> InspectReport:
    """Scan a dataset folder and write the contact sheet, histogram and summary table into `out`
    (default: `<folder>/inspect`)."""
    if per_class < 1 or max_classes < 1 or (limit is not None and limit < 1):
        raise UserError("--per-class, --max-classes and --limit must be at least 1")
    folder = Path(folder)
    manifest = read_manifest(folder, require_complete=False)
    out = make_folder(out if out is not None else folder / "inspect")
    scan = scan_dataset(folder, manifest, per_class, limit, seed)
    if not scan.labels:
        raise UserError(f"no readable samples in {folder} ({'; '.join(scan.skipped) or 'no shards'}); "
                        f"run `synth verify {folder}`")
    summary = class_summary(scan, manifest.num_classes)
    files = [out / CONTACT_SHEET, out / HISTOGRAM, out / SUMMARY]
    try:
        contact_sheet(scan, manifest, folder, per_class, max_classes).save(files[0])
        histogram(summary, scan, manifest, folder).save(files[1])
        summary.to_csv(files[2], float_format="%.4f")
    except OSError as e:
        raise UserError(f"cannot write into {out} ({e.strerror or e}); pass --out to a folder with room") from None
    selection = summary_line(manifest.selection) if manifest.selection is not None else None
    return InspectReport(summary, files, scan.skipped, scan.skipped_samples, scan.shards_read, selection)


def contact_sheet(scan: Scan, manifest: Manifest, folder: Path, per_class: int, max_classes: int) -> Image.Image:
    classes = list(range(min(manifest.num_classes, max_classes)))
    size = manifest.input_spec.size
    tile = size * max(1, 64 // size) if size < 64 else min(size, 96)
    shown = "" if len(classes) == manifest.num_classes else f", classes 0-{classes[-1]} of {manifest.num_classes}"
    title = (f"{folder.name}: {manifest.method}, {sum(len(x) for x in scan.labels)} samples; "
             f"{per_class} random samples per class{shown}")
    rows = [(f"class {c}", scan.examples.get(c, [])) for c in classes]
    return image_grid(rows, tile=tile, columns=per_class, title=title)


def histogram(summary: pd.DataFrame, scan: Scan, manifest: Manifest, folder: Path) -> Image.Image:
    per_class = summary.drop(index="all")
    teacher = np.bincount(np.concatenate(scan.teacher), minlength=manifest.num_classes)[:manifest.num_classes]
    return bar_chart([str(c) for c in per_class.index],
                     {"stored label": per_class["samples"].tolist(), "teacher argmax": teacher.tolist()},
                     x_label="class", y_label="samples",
                     title=f"{folder.name}: samples per class ({int(summary.loc['all', 'samples'])} in all)")
