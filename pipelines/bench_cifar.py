"""The DFKD papers' CIFAR table, reproduced with our methods: one command, given the shared teacher bundle and CIFAR.

    python pipelines/bench_cifar.py --checkpoints ckpt --data-root data --out runs/bench_cifar --results results/cifar.md
    python pipelines/bench_cifar.py --checkpoints ckpt --data-root data --estimate     # the projected GPU time first

`--checkpoints` holds the bundle's files as released (`cifar10_resnet34.pth`, `cifar100_wrn_40_2.pth`, ...: weights
under `state_dict`; the bundle's own spellings `wrn40_2` / `vgg11_bn` are found too), `--data-root` CIFAR-10 / 100 in
torchvision's layout (`cifar-10-batches-py/`, `cifar-100-python/`). For each pair (PAIRS) and method (METHODS) the
product's own no-flag commands run as child processes: `synth generate --teacher T --weights FILE` (the automatic
recipe: cifar10 / cifar100, docs/cifar.md) once (seed 0), then `distill train --student S` once per seed, evaluated on
the real test set at the final epoch; the "real" row distils from the real training images with the teacher's logits
(the same-run real-data KD ceiling, same schedule). Writes <out>/results.csv and <out>/results.md (ours mean +- std over
seeds, each seed, teacher top-1, x ceiling, the published numbers beside ours); --results FILE also writes the table
into a results file. A rerun skips what is finished.

`--estimate` runs nothing long: `synth generate --estimate` per pair and method (the product's own projection, timed
on the device) and a timed burst of stage-two steps (teacher forward + student step at the recipe's batch, compute
only: the shard pipeline comes on top), projected to the whole table; <out>/estimate.md. `--standin` writes tiny
stand-in CIFAR files and bundle-format checkpoints with random weights (the CPU smoke: pipelines/gpu_check.py's part f
and tests/test_bench_cifar.py run the whole command with them at tiny sizes).
"""
from __future__ import annotations

import argparse
import csv
import json
import pickle
import statistics
import sys
import time
from pathlib import Path

from bench_methods import run, say   # a child command with its log and CPU seconds; a line of progress

ROOT = Path(__file__).resolve().parents[1]

# ---- the protocol (published numbers: the methods' own READMEs / papers, R34 -> R18 unless named; final-epoch
# numbers are not what they report: they take the best epoch on the test set) -----------------------------------
PAIRS = {
    "cifar10-resnet34-resnet18": ("cifar10", "cifar_resnet34", "cifar_resnet18",
                                  {"DAFL": 92.22, "DeepInversion": 93.26, "Fast-DFKD (Fast-10)": 94.05, "CMI": 94.84,
                                   "Luo et al.": 95.02, "AdaDFKD": 95.32, "real-data KD": 95.2}),
    "cifar100-resnet34-resnet18": ("cifar100", "cifar_resnet34", "cifar_resnet18",
                                   {"Fast-DFKD (Fast-10)": 74.34, "Luo et al.": 77.02, "CMI": 77.04,
                                    "SpaceshipNet": 77.41, "real-data KD": 77.87}),
    "cifar100-wrn_40_2-wrn_16_2": ("cifar100", "wrn_40_2", "wrn_16_2", {"NAYER (about)": 71.7}),
    # the papers' other standard pairs: our numbers only (no published number we are sure of)
    "cifar10-wrn_40_2-wrn_16_1": ("cifar10", "wrn_40_2", "wrn_16_1", {}),
    "cifar10-wrn_40_2-wrn_16_2": ("cifar10", "wrn_40_2", "wrn_16_2", {}),
    "cifar10-wrn_40_2-wrn_40_1": ("cifar10", "wrn_40_2", "wrn_40_1", {}),
    "cifar10-vgg11-resnet18": ("cifar10", "cifar_vgg11", "cifar_resnet18", {}),
    "cifar100-wrn_40_2-wrn_16_1": ("cifar100", "wrn_40_2", "wrn_16_1", {}),
    "cifar100-wrn_40_2-wrn_40_1": ("cifar100", "wrn_40_2", "wrn_40_1", {}),
    "cifar100-vgg11-resnet18": ("cifar100", "cifar_vgg11", "cifar_resnet18", {}),
}
DEFAULT_PAIRS = [p for p, (_, _, _, published) in PAIRS.items() if published]   # the three with published numbers
# row name -> `synth generate --method` ("real": the real training images with the teacher's logits)
METHODS = {"generator ensemble": "generator", "muse": "muse", "deepinversion": "deepinversion",
           "real training images (ceiling)": "real"}
DEFAULT_METHODS = ["generator ensemble", "real training images (ceiling)"]
CEILING = "real training images (ceiling)"
REAL_IMAGES = 50_000   # CIFAR's training split
# the bundle's names of our architectures (its files may use either spelling)
BUNDLE_NAMES = {"cifar_resnet18": ["resnet18"], "cifar_resnet34": ["resnet34"], "wrn_40_2": ["wrn40_2"],
                "wrn_16_1": ["wrn16_1"], "wrn_16_2": ["wrn16_2"], "wrn_40_1": ["wrn40_1"],
                "cifar_vgg11": ["vgg11", "vgg11_bn"], "cifar_vgg8": ["vgg8", "vgg8_bn"]}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def checkpoint_file(folder: Path, dataset: str, arch: str) -> Path:
    """The bundle's file of `arch` trained on `dataset` (`cifar10_wrn_40_2.pth` or the bundle's `cifar10_wrn40_2.pth`)."""
    names = [arch, *BUNDLE_NAMES.get(arch, [])]
    if arch.startswith("cifar_"):
        names.append(arch[len("cifar_"):])
    for name in dict.fromkeys(names):
        for ext in (".pth", ".pt"):
            path = folder / f"{dataset}_{name}{ext}"
            if path.is_file():
                return path
    raise SystemExit(f"no checkpoint of {arch} on {dataset} in {folder} (looked for "
                     f"{', '.join(f'{dataset}_{n}.pth' for n in dict.fromkeys(names))}): put the teacher bundle's file "
                     "there, or choose other --pairs")


def final_top1(run_dir: Path) -> float | None:
    """The final epoch's top-1 of a finished run (its last metrics row is the epoch count its config.json records),
    else None."""
    config, metrics = run_dir / "config.json", run_dir / "metrics.csv"
    if not (config.exists() and metrics.exists()):
        return None
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    epochs = int(json.loads(config.read_text())["epochs"])
    if not rows or int(rows[-1]["epoch"]) < epochs or rows[-1].get("eval_top1") in (None, ""):
        return None
    return float(rows[-1]["eval_top1"])


def teacher_top1(arch: str, weights: Path, dataset: str, data_root: str) -> float:
    import torch

    from dfkd.common.models import create_model
    from dfkd.distill.datasets import real_dataset

    teacher = create_model(arch, weights=str(weights)).eval()
    test = real_dataset(dataset, teacher.input_spec, train=False, root=data_root)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 1000):
            images, labels = test.batch(torch.arange(i, min(i + 1000, len(test))))
            correct += (teacher(images).argmax(1) == labels).sum().item()
    return 100.0 * correct / len(test)


def args_of(flags: dict) -> list[str]:
    return [a for k, v in flags.items() for a in (f"--{k}", str(v))]


def bench_row(args, pair: str, method_row: str) -> dict:
    """Synthesise once (seed 0), distil once per seed; what is finished is skipped."""
    dataset, teacher, student, _ = PAIRS[pair]
    weights = checkpoint_file(Path(args.checkpoints), dataset, teacher)
    method = METHODS[method_row]
    base = Path(args.out) / pair
    shards = base / "shards" / slug(method_row)
    py = sys.executable
    timing_file = shards / "bench_timing.json"
    if not timing_file.exists():
        if method == "real":
            cmd = [py, str(ROOT / "pipelines" / "bench_methods.py"), "--write-real", teacher, str(weights), dataset,
                   args.data_root, str(args.real_images or REAL_IMAGES), str(shards)]
        else:   # the no-flag command (the automatic recipe), plus the invocation's sizes and device flags
            cmd = [py, "-m", "dfkd.synth", "generate", "--teacher", teacher, "--weights", str(weights), "--method",
                   method, "--out", str(shards), "--seed", "0", "--quiet", *args.synth_flags,
                   *[a for k, v in args.sets.items() for a in ("--set", f"{k}={v}")]]
        resumed = shards.is_dir() and any(shards.iterdir())   # a stopped run's rest: its time is not the whole
        wall, cpu = run(cmd, base / "logs" / f"synth-{slug(method_row)}.log", args.threads)
        timing_file.write_text(json.dumps({"wall_s": None, "cpu_s": None, "resumed": True} if resumed
                                          else {"wall_s": wall, "cpu_s": cpu}))
    timing = json.loads(timing_file.read_text())
    top1 = {}
    for seed in range(args.seeds):
        run_dir = base / "runs" / f"{slug(method_row)}-seed{seed}"
        if final_top1(run_dir) is None:
            cmd = [py, "-m", "dfkd.distill", "train", "--shards", str(shards), "--student", student, "--out",
                   str(run_dir), "--eval-data", dataset, "--data-root", args.data_root, "--seed", str(seed), "--quiet",
                   *args.distill_flags, *(["--resume"] if (run_dir / "checkpoint.pt").exists() else [])]
            run(cmd, base / "logs" / f"distill-{slug(method_row)}-seed{seed}.log", args.threads)
        top1[seed] = final_top1(run_dir)
    say(f"done: {pair} / {method_row}: {top1}")
    return {"pair": pair, "method": method_row, "top1": top1, **timing}


def write_results(out: Path, rows: list[dict], teachers: dict, seconds: float) -> str:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair", "dataset", "teacher", "student", "method", "student_top1_mean", "student_top1_std",
                    "student_top1_per_seed", "teacher_top1", "synthesis_wall_s", "published"])
        for r in rows:
            dataset, teacher, student, published = PAIRS[r["pair"]]
            accs = [r["top1"][s] for s in sorted(r["top1"])]
            w.writerow([r["pair"], dataset, teacher, student, r["method"], f"{statistics.mean(accs):.2f}",
                        f"{statistics.stdev(accs) if len(accs) > 1 else 0:.2f}", " ".join(f"{a:.2f}" for a in accs),
                        f"{teachers[r['pair']]:.2f}", "" if r["wall_s"] is None else f"{r['wall_s']:.1f}",
                        "; ".join(f"{k} {v}" for k, v in published.items())])
    lines = []
    for pair in dict.fromkeys(r["pair"] for r in rows):
        dataset, teacher, student, published = PAIRS[pair]
        sub = [r for r in rows if r["pair"] == pair]
        by = {r["method"]: r for r in sub}
        ceiling = statistics.mean(by[CEILING]["top1"].values()) if CEILING in by else None
        lines += [f"### {dataset.upper()}: {teacher} -> {student} (teacher top-1 {teachers[pair]:.2f}%)", "",
                  "| method | student top-1 (%), final epoch, mean +- std over seeds | per seed | x ceiling | "
                  "synthesis wall-s |", "|---|---|---|---|---|"]
        for r in sub:
            accs = [r["top1"][s] for s in sorted(r["top1"])]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            ratio = f"{statistics.mean(accs) / ceiling:.3f}" if ceiling else "-"
            lines.append(f"| ours: {r['method']} | {statistics.mean(accs):.2f} +- {std:.2f} ({len(accs)}) | "
                         + " / ".join(f"{a:.2f}" for a in accs) + f" | {ratio} | {'-' if r['wall_s'] is None else format(r['wall_s'], '.0f')} |")
        for name, value in published.items():
            lines.append(f"| published: {name} | {value:.2f} | - | - | - |")
        lines.append("")
    lines += ["Ours: the final epoch, one synthesis (seed 0) per row, the seeds vary the distillation. Published: the "
              "methods' own READMEs and papers, best epoch on the test set, each with its own schedule.", "",
              f"Wall time of this invocation: {seconds / 60:.1f} min.", ""]
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


# --------------------------------------------------------------------------- --estimate
def stage_two_images_per_s(teacher: str, weights: Path, student: str, batch: int, device: str, amp: bool,
                           steps: int) -> float:
    """Images/s of stage two's compute (teacher forward, student forward + backward + SGD step) at `batch`, after
    two warm-up steps; random pixels, no shard pipeline."""
    import torch

    from dfkd.common.models import create_model

    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    t = create_model(teacher, weights=str(weights)).eval().to(dev)
    s = create_model(student, num_classes=t.input_spec.num_classes).train().to(dev)
    fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
    t, s = t.to(memory_format=fmt), s.to(memory_format=fmt)
    opt = torch.optim.SGD(s.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=dev).to(memory_format=fmt)
    ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if amp else (lambda: torch.autocast(dev.type, enabled=False))

    def step():
        with ctx():
            with torch.no_grad():
                target = t(x).float().softmax(1)
            loss = torch.sum(-target * s(x).float().log_softmax(1), 1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def estimate(args, pairs: list[str], methods: list[str]) -> str:
    """Projected time of the whole table on this machine's device: synthesis by `synth generate --estimate`, stage
    two by a timed burst of its compute."""
    from dfkd.common.models import create_model
    from dfkd.common.recipes import choose_recipe

    out = Path(args.out) / "estimate"
    rows, total = [], 0.0
    for pair in pairs:
        dataset, teacher, student, _ = PAIRS[pair]
        weights = checkpoint_file(Path(args.checkpoints), dataset, teacher)
        recipe, _ = choose_recipe(create_model(teacher, weights=str(weights)).input_spec)
        flags = dict(zip(args.distill_flags[0::2], args.distill_flags[1::2]))
        epochs = int(flags.get("--epochs", recipe.distill.get("epochs", 10)))
        batch = int(flags.get("--batch-size-per-rank", recipe.distill.get("batch_size_per_rank", 128)))
        device = flags.get("--device", "auto")
        ips = stage_two_images_per_s(teacher, weights, student, batch, device, "--amp" in flags, args.estimate_steps)
        for row in methods:
            method = METHODS[row]
            if method == "real":
                synth_s, images = 60.0, args.real_images or REAL_IMAGES   # teacher forward over the training split
            else:
                folder = out / pair / slug(row)
                run([sys.executable, "-m", "dfkd.synth", "generate", "--teacher", teacher, "--weights", str(weights),
                     "--method", method, "--out", str(folder), "--overwrite", "--quiet", "--estimate", *args.synth_flags,
                     *[a for k, v in args.sets.items() for a in ("--set", f"{k}={v}")]],
                    out / "logs" / f"{pair}-{slug(row)}.log", args.threads)
                found = json.loads((folder / "estimate.json").read_text())
                synth_s, images = float(found["total_s"]), int(found["num_images"]) - int(found.get("val_images", 0))
            distill_s = epochs * images / ips * args.seeds
            rows.append((pair, row, recipe.name, images, epochs, synth_s, ips, distill_s))
            total += synth_s + distill_s
    lines = ["| pair | method | recipe | images | epochs | synthesis s (synth generate --estimate) | stage-two img/s "
             "(compute) | stage two s, all seeds |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p} | {m} | {r} | {i:,} | {e} | {s:.0f} | {ips:.0f} | {d:.0f} |" for p, m, r, i, e, s, ips, d in rows]
    lines += ["", f"Projected total: **{total / 3600:.2f} h** for {len(pairs)} pairs x {len(methods)} rows x {args.seeds} "
              "seeds on this device (stage two: compute only; the shard pipeline and evaluation come on top).", ""]
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimate.md").write_text(text)
    (out / "estimate.json").write_text(json.dumps({"total_s": total, "rows": rows}, indent=1))
    return text


# --------------------------------------------------------------------------- stand-in files (the CPU smoke)
def write_standin_cifar(root: Path, classes: int = 10, n: int = 20, seed: int = 0) -> None:
    """CIFAR-10 / 100's python batches in torchvision's layout (pickled dicts of uint8 rows), random pixels."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if classes == 10:
        folder, files, meta, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + [
            "test_batch"], "batches.meta", "labels"
        meta_content = {"label_names": [f"c{i}" for i in range(10)]}
    else:
        folder, files, meta, key = root / "cifar-100-python", ["train", "test"], "meta", "fine_labels"
        meta_content = {"fine_label_names": [f"c{i}" for i in range(100)]}
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        batch = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                 key: [int(v) for v in np.arange(n) % classes]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / meta).write_bytes(pickle.dumps(meta_content))


def write_standin_checkpoint(path: Path, arch: str, classes: int, bundle_arch: str | None = None) -> None:
    """A checkpoint in the bundle's format (`state_dict`, `arch` in the bundle's spelling, its training extras):
    random weights of our `arch`, whose parameter names are the bundle's."""
    import torch

    from dfkd.common.models import create_model

    model = create_model(arch, num_classes=classes)
    torch.save({"epoch": 200, "arch": bundle_arch or BUNDLE_NAMES.get(arch, [arch])[0], "best_acc1": 0.0,
                "state_dict": model.state_dict()}, path)


def write_standins(folder: Path, pairs: list[str], n: int = 20) -> tuple[Path, Path]:
    """Stand-in CIFAR files and teacher checkpoints for `pairs`: (checkpoints folder, data root)."""
    ckpt, data = folder / "checkpoints", folder / "data"
    ckpt.mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        dataset, teacher, _, _ = PAIRS[pair]
        classes = 100 if dataset == "cifar100" else 10
        if not (data / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")).exists():
            write_standin_cifar(data, classes, n)
        path = ckpt / f"{dataset}_{teacher}.pth"
        if not path.exists():
            write_standin_checkpoint(path, teacher, classes)
    return ckpt, data


def parse_sets(items: list[str], what: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{what} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default="checkpoints", help="folder of the bundle's <dataset>_<arch>.pth files")
    parser.add_argument("--data-root", default="data", help="folder above cifar-10-batches-py/ and cifar-100-python/")
    parser.add_argument("--out", default="runs/bench_cifar")
    parser.add_argument("--pairs", default=",".join(DEFAULT_PAIRS),
                        help="comma-separated subset of " + ", ".join(PAIRS) + "; `all` for every one (default: the "
                        "pairs with published numbers)")
    parser.add_argument("--methods", default=",".join(slug(m) for m in DEFAULT_METHODS),
                        help="comma-separated subset of " + ", ".join(slug(m) for m in METHODS))
    parser.add_argument("--seeds", type=int, default=3, help="distillation seeds per row (0 .. N-1)")
    parser.add_argument("--estimate", action="store_true", help="project the whole table's time; run nothing long")
    parser.add_argument("--estimate-steps", type=int, default=20, help="timed stage-two steps per pair (--estimate)")
    parser.add_argument("--gpu", action="store_true", help="both stages on CUDA with bf16 and channels-last")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every child command")
    parser.add_argument("--images", type=int, default=None, help="images per synthesis instead of the recipe's")
    parser.add_argument("--real-images", type=int, default=None, help="real training images of the ceiling row "
                        f"(default: all {REAL_IMAGES:,})")
    parser.add_argument("--distill-epochs", type=int, default=None, help="epochs instead of the recipe's")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option for every synthesis (as `synth generate --set`; dry runs: steps=2)")
    parser.add_argument("--distill-set", dest="distill_sets", action="append", default=[], metavar="FLAG=VALUE",
                        help="a `distill train` flag for every run (e.g. batch-size-per-rank=16)")
    parser.add_argument("--synth-set", dest="synth_sets", action="append", default=[], metavar="FLAG=VALUE",
                        help="a `synth generate` flag for every synthesis (e.g. shard-size=16)")
    parser.add_argument("--standin", metavar="DIR", help="write stand-in CIFAR files and random bundle-format "
                        "checkpoints into DIR and use them (the CPU smoke)")
    parser.add_argument("--results", metavar="FILE", help="also write the table, headed with date, machine, commit "
                        "and command, into FILE (e.g. results/cifar.md)")
    args = parser.parse_args(argv)
    pairs = list(PAIRS) if args.pairs == "all" else [p for p in args.pairs.split(",") if p]
    by_slug = {slug(m): m for m in METHODS}
    methods = [by_slug.get(m) for m in args.methods.split(",") if m]
    unknown = [p for p in pairs if p not in PAIRS] + [m for m, r in zip(args.methods.split(","), methods) if r is None]
    if unknown:
        raise SystemExit(f"unknown pair(s) or method(s) {unknown}; pairs: {', '.join(PAIRS)}; methods: "
                         f"{', '.join(by_slug)}")
    args.out = str(Path(args.out).resolve())
    if args.standin:
        ckpt, data = write_standins(Path(args.standin).resolve(), pairs)
        args.checkpoints, args.data_root = str(ckpt), str(data)
    args.sets = parse_sets(args.sets, "--set")
    synth = {"threads": args.threads, **({"device": "cuda", "amp": "bf16"} if args.gpu else {}),
             **({"num-images": args.images} if args.images else {}), **parse_sets(args.synth_sets, "--synth-set")}
    distill = {"threads": args.threads, **({"device": "cuda", "amp": "bf16"} if args.gpu else {}),
               **({"epochs": args.distill_epochs} if args.distill_epochs else {}),
               **parse_sets(args.distill_sets, "--distill-set")}
    args.synth_flags = args_of(synth) + (["--channels-last"] if args.gpu else [])
    args.distill_flags = args_of(distill) + (["--channels-last"] if args.gpu else [])
    started = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.estimate:
        print(estimate(args, pairs, methods))
        return
    rows = [bench_row(args, pair, m) for pair in pairs for m in methods]
    teachers = {p: teacher_top1(PAIRS[p][1], checkpoint_file(Path(args.checkpoints), PAIRS[p][0], PAIRS[p][1]),
                                PAIRS[p][0], args.data_root) for p in pairs}
    text = write_results(Path(args.out), rows, teachers, time.perf_counter() - started)
    print("\n" + text)
    if args.results:
        from results_header import write_results_file
        write_results_file(args.results, text, title="The papers' CIFAR benchmark")


if __name__ == "__main__":
    main()
