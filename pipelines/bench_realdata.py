"""Real-data throughput: teacher training and evaluation from an ImageFolder of 28 px PNGs against MNIST
held in memory, in one run (same model, same schedule, same threads).

    python pipelines/bench_realdata.py --out runs/bench_realdata --threads 1

Writes MNIST's train and test images as PNGs into `<out>/mnist-png/{train,val}/<digit>/` (once), then
trains lenet5 for `--epochs` epochs on each source, alternating the two arms `--repeats` times, and times
the evaluation of the test split. The ImageFolder arm's first run decodes every PNG once into the
cache under `<out>/data/cache/` (timed separately); the arms' training and evaluation throughput then
read the same uint8 path. Prints a markdown table and writes it to `<out>/results.md`.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path


def write_png_folder(folder: Path, data_root: str) -> None:
    import numpy as np
    from PIL import Image

    from dfkd.distill.datasets import load_mnist

    if (folder / "done").is_file():
        return
    shutil.rmtree(folder, ignore_errors=True)
    for split, train in (("train", True), ("val", False)):
        images, labels = load_mnist(data_root, train)
        for digit in range(10):
            (folder / split / str(digit)).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images.numpy(), labels.tolist())):
            Image.fromarray(np.ascontiguousarray(image)).save(folder / split / str(label) / f"{i:05d}.png")
    (folder / "done").write_text("ok\n")


def eval_throughput(teacher_path: Path, data: str, data_root: str, repeats: int = 3) -> float:
    import torch

    from dfkd.distill.datasets import real_dataset
    from dfkd.common.models import create_model
    from dfkd.distill.evaluation import evaluate_top1

    model = create_model("lenet5", weights=str(teacher_path))
    dataset = real_dataset(data, model.input_spec, train=False, root=data_root)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate_top1(model, dataset, torch.device("cpu"))
        best = max(best, len(dataset) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_realdata")
    parser.add_argument("--data-root", default="data", help="where MNIST's IDX files are (or are fetched to)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from dfkd.distill.datasets import real_dataset
    from dfkd.common.models import create_model
    from dfkd.distill.teacher import TeacherConfig, train_teacher

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    folder = out / "mnist-png"
    start = time.perf_counter()
    write_png_folder(folder, args.data_root)
    print(f"PNG folder ready in {time.perf_counter() - start:.0f} s: {folder}", flush=True)
    cache_root = out / "data"
    shutil.rmtree(cache_root / "cache", ignore_errors=True)
    spec = create_model("lenet5").input_spec
    start = time.perf_counter()
    for train in (True, False):
        real_dataset(str(folder), spec, train=train, root=cache_root)
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    for train in (True, False):
        real_dataset(str(folder), spec, train=train, root=cache_root)
    cached_s = time.perf_counter() - start

    arms = {"MNIST in memory (--data mnist)": ("mnist", args.data_root),
            "ImageFolder of 28 px PNGs (--data <folder>)": (str(folder), str(cache_root))}
    train_rates = {name: [] for name in arms}
    eval_rates = {name: [] for name in arms}
    for repeat in range(args.repeats):
        for name, (data, data_root) in arms.items():
            path = out / "teachers" / f"{data == 'mnist' and 'mnist' or 'folder'}-{repeat}.pt"
            path.unlink(missing_ok=True)
            metrics = train_teacher(TeacherConfig(model="lenet5", out=str(path), data=data, data_root=data_root,
                                                  epochs=args.epochs, workers=0, progress=False))
            train_rates[name].append(metrics["images_per_s"])
            eval_rates[name].append(eval_throughput(path, data, data_root))
            print(f"{name}, run {repeat + 1}: train {metrics['images_per_s']:.0f} img/s, eval "
                  f"{eval_rates[name][-1]:.0f} img/s, test top-1 {metrics['test_top1']:.2f}%", flush=True)

    mnist, png = arms
    lines = [f"lenet5, {args.epochs} epochs of MNIST's 60,000 training images per run, batch 128, "
             f"--threads {args.threads}, {args.repeats} alternating runs per arm (median)", "",
             "| source | train img/s | eval img/s (10,000 test images, best of 3) |", "|---|---|---|"]
    for name in arms:
        lines.append(f"| {name} | {statistics.median(train_rates[name]):.0f} | {statistics.median(eval_rates[name]):.0f} |")
    lines += ["", f"ImageFolder / MNIST: train {statistics.median(train_rates[png]) / statistics.median(train_rates[mnist]):.2f}, "
              f"eval {statistics.median(eval_rates[png]) / statistics.median(eval_rates[mnist]):.2f}",
              f"One-time decode of the 70,000 PNGs into the uint8 cache: {decode_s:.1f} s; "
              f"later runs open the memory-mapped cache in {cached_s:.2f} s."]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
