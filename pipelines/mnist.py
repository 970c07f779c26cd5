"""The main job: data-free distillation of LeNet-5 into LeNet-5-half on MNIST, end to end, with baselines.

    bash pipelines/mnist.sh                    # sets up .venv, then runs this file
    python pipelines/mnist.py --out runs/mnist # inside the environment

Steps (each is the product's own command line, printed before it runs; a rerun skips finished steps
and resumes unfinished ones):
  1. `distill teacher`   lenet5 on the real MNIST training split
  2. `synth generate`    the generator ensemble against the frozen teacher -> shards, with the
                         small-grey recipe (common/recipes/small-grey.toml: every synthesis setting)
  3. baselines' shards   Gaussian noise (`synth generate --method noise`, the floor) and the real MNIST
                         training images with teacher logits (the ceiling)
  4. `distill train`     lenet5_half on each set of shards with the recipe's [distill] schedule,
                         evaluated on the MNIST test split
  5. a results table (markdown + CSV) in --out, and the same table under a header (date, machine, commit,
     command) in results/mnist.md (--results), whose notes below the table are kept
"""
from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---- the recipe: common/recipes/small-grey.toml, both stages (what `synth generate` and `distill train`
# pick for this teacher anyway; named here so that every set of shards, the baselines too, gets the same) ----
RECIPE = "small-grey"
TEACHER, STUDENT = "lenet5", "lenet5_half"
TEACHER_EPOCHS = 8
THREADS = 1  # per `distill train`: its 2 DataLoader workers take the other core
TITLE = "MNIST main job: LeNet-5 -> LeNet-5-half, data-free"

def run(cmd: list[str]) -> float:
    """Run one stage's command line, streaming its output; return wall seconds."""
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def final_top1(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["eval_top1"])


def write_real_shards(teacher_path: Path, out: Path, data_root: str) -> None:
    """MNIST's training images with the teacher's logits, in the shard format (the KD-on-real ceiling)."""
    import torch

    from dfkd.distill.datasets import load_mnist
    from dfkd.common.models import create_model, teacher_record
    from dfkd.common.recipes import load_recipe
    from dfkd.common.shards import (Sample, build_manifest, read_manifest, sample_key, shard_name, write_manifest,
                                    write_shard)

    if (out / "manifest.json").exists() and read_manifest(out, require_complete=False).complete:
        return
    recipe = load_recipe(RECIPE).synth  # the same shard size and image format as the synthetic sets
    shard_size, image_format = recipe["shard_size"], recipe["image_format"]
    out.mkdir(parents=True, exist_ok=True)
    teacher = create_model(TEACHER, weights=str(teacher_path)).eval()
    spec = teacher.input_spec
    images, labels = load_mnist(data_root, train=True)
    record = teacher_record(TEACHER, str(teacher_path), teacher)
    config = {"method": "real-mnist-train", "teacher_sha256": record.weights_sha256}
    manifest = build_manifest(record, method="real-mnist-train", config=config, image_format=image_format,
                              planned_samples=len(images), shard_size=shard_size)
    for index, first in enumerate(range(0, len(images), shard_size)):
        x = images[first:first + shard_size]
        with torch.no_grad():
            logits = teacher(spec.normalize(x.float().div(255).unsqueeze(1))).half().numpy()
        samples = (Sample(sample_key(first + i), x[i].numpy()[:, :, None], int(labels[first + i]), logits[i], {})
                   for i in range(len(x)))
        manifest.shards.append(write_shard(out / shard_name(index), samples, image_format))
    manifest.complete = True
    write_manifest(out, manifest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/mnist", help="Folder for teacher, shards, runs and results.")
    parser.add_argument("--data-root", default="data", help="Where MNIST is (or is fetched to).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-baselines", action="store_true", help="Only teacher, synthesis, distillation.")
    parser.add_argument("--results", default=str(ROOT / "results" / "mnist.md"),
                        help="Also write the table, headed with date, machine, commit and command, here ('' = no).")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    py = sys.executable
    teacher_path = out / "teacher" / f"{TEACHER}.pt"
    seconds: dict[str, float] = {}

    if not teacher_path.exists():
        seconds["teacher"] = run([py, "-m", "dfkd.distill", "teacher", "--model", TEACHER, "--data", "mnist",
                                  "--data-root", args.data_root, "--epochs", str(TEACHER_EPOCHS),
                                  "--seed", str(args.seed), "--out", str(teacher_path)])
    common = ["--teacher", TEACHER, "--weights", str(teacher_path), "--recipe", RECIPE, "--seed", str(args.seed)]
    shard_sets = {"generator ensemble (data-free)": out / "shards" / "generator"}
    seconds["synthesis"] = run([py, "-m", "dfkd.synth", "generate", *common, "--method", "generator",
                                "--out", str(shard_sets["generator ensemble (data-free)"])])
    if not args.skip_baselines:
        start = time.perf_counter()
        shard_sets["Gaussian noise (floor)"] = out / "shards" / "noise"
        run([py, "-m", "dfkd.synth", "generate", *common, "--method", "noise", "--out", str(out / "shards" / "noise")])
        shard_sets["real MNIST train images (ceiling)"] = out / "shards" / "real"
        write_real_shards(teacher_path, out / "shards" / "real", args.data_root)
        seconds["baseline shards"] = time.perf_counter() - start

    results = []
    for name, shards in shard_sets.items():
        run_dir = out / "runs" / shards.name
        resume = ["--resume"] if (run_dir / "checkpoint.pt").exists() else []
        seconds[f"distill {shards.name}"] = run(
            [py, "-m", "dfkd.distill", "train", "--shards", str(shards), "--student", STUDENT, "--out", str(run_dir),
             "--eval-data", "mnist", "--data-root", args.data_root, "--seed", str(args.seed), "--recipe", RECIPE,
             "--threads", str(THREADS), *resume])
        results.append((name, final_top1(run_dir)))

    teacher_top1 = teacher_accuracy(teacher_path, args.data_root)
    seconds["whole pipeline"] = time.perf_counter() - started
    text = write_results(out, teacher_top1, results, seconds)
    if args.results:
        from results_header import write_results_file
        write_results_file(args.results, text, title=TITLE)


def teacher_accuracy(teacher_path: Path, data_root: str) -> float:
    import torch

    from dfkd.distill.datasets import mnist_dataset
    from dfkd.common.models import create_model

    teacher = create_model(TEACHER, weights=str(teacher_path)).eval()
    images, labels = mnist_dataset(data_root, False, teacher.input_spec).tensors
    with torch.no_grad():
        return 100.0 * (teacher(images).argmax(1) == labels).float().mean().item()


def write_results(out: Path, teacher_top1: float, results: list[tuple[str, float]], seconds: dict) -> str:
    lines = ["| model | trained on | MNIST test top-1 (%) |", "|---|---|---|",
             f"| {TEACHER} (teacher) | real MNIST train | {teacher_top1:.2f} |"]
    lines += [f"| {STUDENT} (student, KD) | {name} | {top1:.2f} |" for name, top1 in results]
    timing = ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
    text = "\n".join(lines) + f"\n\nWall time of this invocation (finished steps are skipped on a rerun): {timing}.\n"
    (out / "results.md").write_text(text)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "trained_on", "test_top1"])
        w.writerow([TEACHER, "real MNIST train", f"{teacher_top1:.2f}"])
        w.writerows([STUDENT, name, f"{top1:.2f}"] for name, top1 in results)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
