"""Every synthesis method side by side: same teacher, same image budget, same `distill train` schedule.

    bash pipelines/bench_methods.sh                         # sets up .venv, then runs this file
    python pipelines/bench_methods.py --out runs/bench_methods [--seeds 3] [--jobs 2] [--configs mnist28]

Five configurations (CONFIGS): MNIST at 28 px with lenet5 -> lenet5_half; MNIST zero-padded to 32 px
and replicated to RGB with a CIFAR ResNet-8 teacher (so MUSE's 8 / 16 / 32 px path really runs); MNIST-M
(digits blended into real colour photographs, built offline by distill/datasets.py) with a CIFAR ResNet-20
teacher and a ResNet-8 student, which adds the real-data KD ceiling as a row (and a "x ceiling" column) and
takes its image budget, method options and distillation schedule from the shipped small-rgb recipe (what
`synth generate` and `distill train` give such a teacher without flags); the same test bed with every method at
about equal synthesis CPU and a smaller budget (mnistm32-methods: 10k images x 5 epochs, 3 seeds
of every row, a longer command: `--configs mnistm32-methods`); and MNIST-M at 64 px (mnistm64:
MUSE's 16 / 32 / 64 px streams against the 64 px ensemble at about equal synthesis cost; a
longer command: `--configs mnistm64`). Per configuration each
method (VARIANTS) synthesises once (seed 0) with `synth generate`; the student is then distilled from
those shards once per seed (the seeds vary distillation only) and evaluated on the real test split of
the configuration's dataset, final epoch. Each command is the product's own command line, run as a child process
(`--jobs` at a time, one thread each); its CPU seconds come from the child's rusage, so a busy machine
slows the wall clock but barely moves the CPU column.

Writes <out>/results.csv and <out>/results.md (one row per configuration x method: images, synthesis
CPU-seconds and wall seconds, images per synthesis CPU-second, the distillation's epochs and CPU-seconds,
student top-1 mean +- std over seeds and each seed, teacher top-1), plus the low-resolution cost ratio. A
row with the stopping rule (STOP_ROWS) shows the epochs each seed ran of its cap when the rule ended a run
early, and that run counts as finished. A rerun skips what is finished.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ---- the benchmark (defaults grouped and visible) ----------------------------------------------
# a configuration's per-row options that put a row at about the ensemble's (8 x 80) synthesis cost: with the teacher on
# the full-size view every MUSE stream costs about a full-size step, so 3 per resolution x 70 steps
EQUAL_COST_ROWS = {"muse, full-size teacher view": {"num_generators": 3, "steps": 70}}
# rows that synthesise as "generator ensemble" does plus these `synth generate` flags (top-level options: `--set`
# carries method options only): the teacher's choice among twice the images (`--select`). They run only on the
# configurations whose "only" names them (LISTED_ONLY, as the stopping rows below)
SYNTH_FLAGS = {"generator ensemble, boundary selection (2x candidates)": {"select": "boundary", "oversample": 2},
               "generator ensemble, confident selection (2x candidates)": {"select": "confident", "oversample": 2}}
# the stopping rule on the held-out KL (`distill train --stop-patience`) on the ensemble's shards: --epochs becomes the
# cap, a run may end earlier (its epochs and distillation CPU-s show what it saved); with twice the epochs as the cap,
# whether the rule finds a better end than the fixed schedule when it is let run longer
STOP_ROWS = {"generator ensemble, stop on the held-out KL": ("generator ensemble", {"stop-patience": 2}),
             "generator ensemble, stop on the held-out KL, cap twice the epochs": ("generator ensemble",
                                                                                  {"stop-patience": 2, "epochs": 2.0})}
# what the harder test beds run: the recipe, its ceiling and the candidates measured on them (a fixed twice the
# epochs beside the stopping rule capped there)
TESTBED_ROWS = ["generator ensemble", "real training images (ceiling)", *SYNTH_FLAGS, *STOP_ROWS,
                "generator ensemble, twice the epochs"]
CONFIGS = {
    "mnist28": {"title": "MNIST 28 px, lenet5 -> lenet5_half", "teacher": "lenet5", "teacher_epochs": 8,
                "student": "lenet5_half", "images": 10_000, "distill_epochs": 5, "options": {},
                # = "muse": LeNet-5's MUSE sees the full-size view (and LeNet-5 takes 28 px only)
                "skip": ["muse, full-size teacher view", "muse, teacher on native views in stage two"]},
    # ResNet-8 costs ~30x LeNet-5 per image, in synthesis and as the online teacher in distillation:
    # fewer images (more epochs: lenet5_half needs ~300 SGD steps), smaller generator batches, DeepInversion mostly at half size, and MUSE's
    # teacher sees each resolution as it is (a ResNet takes 8 and 16 px; LeNet-5 cannot). Shards are
    # sampled at the training noise scale: at 2x (GEN's, which helps LeNet-5) the ResNet-8 teacher agrees
    # with the requested class on 54% of the ensemble's stored images instead of 85%
    "mnist32rgb": {"title": "MNIST padded to 32 px RGB, cifar_resnet8 -> lenet5_half", "teacher": "cifar_resnet8",
                   "teacher_epochs": 2, "student": "lenet5_half", "images": 5_000, "distill_epochs": 8,
                   "skip": ["generator ensemble + adversarial",    # measured on mnist28 only (time)
                            "muse, full-size teacher view"],       # a README probe: 17.16 against native's 24.57
                   "options": {"generator": {"train_batch_size": 100, "steps": 80, "sample_noise_scale": 1.0},
                               "muse": {"train_batch_size": 100, "steps": 80, "teacher_input": "native",
                                        "sample_noise_scale": 1.0},
                               "deepinversion": {"iterations": 4, "low_res_iterations": 16}}},
    # MNIST-M (digits blended into real colour photographs, distill/datasets.py: built offline, cached under
    # --data-root): a ResNet pair on natural colour statistics. ResNet-20 is the deepest CIFAR ResNet whose
    # teacher trains in about 10 min on one thread here (4 epochs of 60k images, ~150 s each); the online
    # ResNet-20 teacher makes a distillation step ~1.8x a ResNet-8 training step. "ceiling": the real-data KD
    # row (as many real training images as synthetic ones, a seeded subset, with the teacher's logits).
    # "recipe": the image budget, each method's options and the distillation schedule are the shipped
    # recipe's (what `synth generate` / `distill train` give such a teacher without flags), so the table
    # measures the defaults; a variant's own options (adversarial, ablations) still apply on top
    "mnistm32": {"title": "MNIST-M 32 px RGB, cifar_resnet20 -> cifar_resnet8", "data": "mnistm",
                 "teacher": "cifar_resnet20", "teacher_epochs": 4, "student": "cifar_resnet8", "ceiling": True,
                 "recipe": "small-rgb"},
    # every method on mnistm32's test bed (same dataset, teacher command and student) at about
    # equal synthesis CPU and one distillation schedule, 3 seeds each: the recipe's method settings (the ensemble's
    # 8 x 80 steps is the budget; DeepInversion's 4 full + 16 half-size iterations per image cost about the same)
    # but 10k images x 5 epochs, so that every row fits 2 CPU cores (the recipe's 20k x 10 costs ~4x per row). Equal
    # cost as in mnistm64: 6 native-view generators per resolution (a 8 / 16 / 32 px triple ~ 1/16 + 1/4 + 1 of a
    # full-size step), and 3 per resolution x 70 steps with the teacher on the full-size view. The ablations that
    # change one switch keep MUSE's 6 per resolution; the two single-resolution ablations keep their 3 generators
    # (so the low-resolution cost line compares like with like) and report their own CPU. A separate command
    "mnistm32-methods": {"title": "MNIST-M 32 px RGB, cifar_resnet20 -> cifar_resnet8, every method at equal synthesis CPU",
                         "data": "mnistm", "teacher": "cifar_resnet20", "teacher_epochs": 4, "student": "cifar_resnet8",
                         "ceiling": True, "recipe": "small-rgb", "images": 10_000, "distill_epochs": 5,
                         "options": {"muse": {"num_generators": 6}}, "rows": EQUAL_COST_ROWS, "separate": True},
    # the MNIST main job's budget (the small-grey recipe: 96k images, 8 x 200 generator steps, 20 epochs) for the rows
    # that compete for a recipe default; the second dataset a setting must win on (with --paired-seeds). No ceiling
    # row (MNIST is not held as uint8 arrays here): the main job measures it. A separate command
    "mnist28-recipe": {"title": "MNIST 28 px, lenet5 -> lenet5_half", "teacher": "lenet5", "teacher_epochs": 8,
                       "student": "lenet5_half", "recipe": "small-grey", "separate": True,
                       "only": ["generator ensemble", "generator ensemble + adversarial",
                                "generator ensemble, crop + colour jitter", "generator ensemble, cutmix instead of mixup",
                                "generator ensemble, twice the epochs"]},
    # MUSE where its claim lives: the same dataset at 64 px (digits and photo patches drawn at
    # 64 px, distill/datasets.py's mnistm64), MUSE's 16 / 32 / 64 px streams against the 64 px ensemble at about equal
    # synthesis CPU (the table reports the measured CPU-s). The recipe's synthesis settings, but a budget that fits
    # 2 CPU cores in about 1.5 h: at 64 px a ResNet-20 step costs ~5x its 32 px step (3.3 s per 128 images on one
    # thread), so a ResNet-14 teacher trained 1 epoch, and 10k images distilled 5 epochs (the recipe: 20k, 10).
    # Equal cost: a native-view MUSE stream triple costs about 1/16 + 1/4 + 1 of a full-size step, so 6 generators
    # per resolution (18 streams x 80 steps) ~ the ensemble's 8 x 80; with the teacher on the full-size (upsampled)
    # view every stream costs about a full step: 3 per resolution x 70 steps. A separate, longer command
    "mnistm64": {"title": "MNIST-M 64 px RGB, cifar_resnet14 -> cifar_resnet8", "data": "mnistm64", "resolution": 64,
                 "teacher": "cifar_resnet14", "teacher_epochs": 1, "teacher_args": ["--warmup-epochs", "0.2"],
                 "student": "cifar_resnet8", "ceiling": True, "recipe": "small-rgb", "images": 10_000,
                 "distill_epochs": 5, "options": {"muse": {"num_generators": 6}}, "rows": EQUAL_COST_ROWS,
                 "separate": True,
                 "only": ["generator ensemble", "muse", "muse, full-size teacher view",
                          "muse, teacher on native views in stage two", "real training images (ceiling)"]},
    # the DFKD papers' CIFAR architectures on the same MNIST-M test bed, with the recipe `synth generate` gives such a
    # teacher without flags ("auto", resolved from the teacher's input spec when the run starts: cifar10 for these
    # architectures, which carry the CIFAR teacher bundle's normalisation), against the same-run real-data ceiling.
    # --teacher-arch / --student-arch pick the pair (default wrn_40_2 -> wrn_16_2; cifar_resnet34 -> cifar_resnet18
    # is the other); the recipe's budget (51,200 images, 200 epochs) is a GPU's: --images, --distill-epochs and --set
    # give a CPU's (docs/cifar.md has the commands and their CPU cost). A separate command
    # the harder test beds, each against its own same-run real-data ceiling at the recipe's image count: 100 classes
    # of two-digit pairs on photographs (distill/datasets.py's mnistm100: CIFAR-100's class count at 32 px) with the
    # small-rgb recipe, and MNIST-M seen in grey by a 1-channel 28 px LeNet-5 (the dataset's pixels averaged over
    # the channels and resized, as any 1-channel model sees it) with the small-grey recipe. Separate commands
    "mnistm100": {"title": "MNIST-M digit pairs (100 classes) 32 px RGB, cifar_resnet20 -> cifar_resnet8",
                  "data": "mnistm100", "teacher": "cifar_resnet20", "teacher_epochs": 4, "student": "cifar_resnet8",
                  "ceiling": True, "recipe": "small-rgb", "separate": True,
                  "only": TESTBED_ROWS},
    "mnistm-grey": {"title": "MNIST-M in grey 28 px, lenet5 -> lenet5_half", "data": "mnistm", "teacher": "lenet5",
                    "teacher_epochs": 8, "student": "lenet5_half", "ceiling": True, "recipe": "small-grey",
                    "separate": True,
                    "only": TESTBED_ROWS},
    # the 100-class pairs seen in grey by a 28 px LeNet-5 with the small-grey recipe: a second 100-class dataset and
    # teacher beside mnistm100, as mnistm-grey is beside mnistm32
    "mnistm100-grey": {"title": "MNIST-M digit pairs (100 classes) in grey 28 px, lenet5 -> lenet5_half",
                       "data": "mnistm100", "teacher": "lenet5", "teacher_epochs": 8, "student": "lenet5_half",
                       "ceiling": True, "recipe": "small-grey", "separate": True,
                       "only": TESTBED_ROWS},
    "mnistm32-papers": {"title": "MNIST-M 32 px RGB, the papers' CIFAR architectures", "data": "mnistm",
                        "teacher": "wrn_40_2", "teacher_epochs": 2, "student": "wrn_16_2", "ceiling": True,
                        "recipe": "auto", "separate": True, "options": {},
                        "only": ["generator ensemble", "real training images (ceiling)"]},
}
SHARD_SIZE, IMAGE_FORMAT = 2_000, "npy"
GEN = {"train_batch_size": 200, "width": 16, "latent_dim": 64, "steps": 120, "diversity_weight": 20.0,
       "feature_diversity_weight": 10.0, "sample_noise_scale": 2.0}
# name -> (method, options, pinned): `options` are the row's base settings (the generator methods: 3 generators x
# GEN["steps"] steps), under CONFIGS[...]["options"][method] (a configuration's or its recipe's table); `pinned`
# are what the row is about (an ablation's switch) and win over the configuration's table
VARIANTS = {
    "noise (floor)": ("noise", {}, {}),
    "generator ensemble": ("generator", {**GEN, "num_generators": 3}, {}),
    "generator ensemble + adversarial": ("generator", {**GEN, "num_generators": 3}, {"adversarial_weight": 1.0}),
    "deepinversion": ("deepinversion", {"iterations": 20, "lr": 0.1, "bn_weight": 1.0, "flip": False}, {}),
    "muse": ("muse", dict(GEN), {}),
    "muse without CAM": ("muse", dict(GEN), {"cam_weight": 0.0}),
    "muse without multi-resolution (3 x full)": ("muse", dict(GEN), {"scales": "1", "num_generators": 3}),
    "muse without embedding diversity": ("muse", dict(GEN), {"embedding_noise": 0.0}),
    "muse low-resolution only (3 x 1/4)": ("muse", dict(GEN), {"scales": "0.25", "num_generators": 3}),
    # the teacher sees (and the shards store) every stream upsampled to full size: no native-view gap, and no
    # low-resolution saving in the teacher (MUSE's own default; the ResNet configurations' tables set native)
    "muse, full-size teacher view": ("muse", dict(GEN), {"teacher_input": "upsampled"}),
    # not a synthesis method: real training images with the teacher's logits (configurations with "ceiling")
    "real training images (ceiling)": ("real", {}, {}),
    # the ensemble's method options; SYNTH_FLAGS adds the selection
    **{row: ("generator", {**GEN, "num_generators": 3}, {}) for row in SYNTH_FLAGS},
}
# rows that run only on a configuration whose "only" list names them (a configuration without one runs the others)
LISTED_ONLY = set(SYNTH_FLAGS) | set(STOP_ROWS)
CEILING = "real training images (ceiling)"
# name -> (row, `distill train` flags): rows with no synthesis of their own, distilling another row's shards with
# other stage-two flags (their synthesis columns are that row's). "teacher on the native views": the online
# teacher sees each MUSE image at its native 16 / 32 / 64 px (the view the native-mode streams were made for)
# instead of the upsampled one the student sees
# The "generator ensemble, ..." rows: stage-two candidates on the ensemble's own shards (an "epochs" value
# changes the distillation length, so the row's CPU moves along the budget axis)
STAGE_TWO_ROWS = {"muse, teacher on native views in stage two": ("muse", {"teacher-view": "native"}),
                  "generator ensemble, crop + colour jitter": ("generator ensemble", {"aug": "crop-colour"}),
                  "generator ensemble, cutmix instead of mixup": ("generator ensemble", {"cutmix": 1.0, "mixup": 0.0}),
                  "generator ensemble, half the epochs": ("generator ensemble", {"epochs": 0.5}),
                  "generator ensemble, twice the epochs": ("generator ensemble", {"epochs": 2.0}),
                  "generator ensemble, crop + colour jitter, twice the epochs": ("generator ensemble",
                                                                                {"aug": "crop-colour", "epochs": 2.0}),
                  **STOP_ROWS}
ROWS = [*VARIANTS, *STAGE_TWO_ROWS]
DISTILL = {"batch-size-per-rank": 128, "lr": 0.05, "warmup-epochs": 1, "temperature": 4.0, "mixup": 1.0,
           "aug": "translate", "workers": 1, "threads": 1}

_print_lock = threading.Lock()
THREADS = 1   # torch threads of every command (--threads)
SETS: dict = {}   # method options over every row's own (--set), for the methods that have them
DISTILL_SETS: dict = {}   # `distill train` flags over every configuration's own (--distill-set), e.g. {"aug": "crop-colour"}


def retitled(title: str, teacher: str, student: str, new_teacher: str, new_student: str) -> str:
    """A configuration's title with its teacher -> student pair replaced by the one given on the command line
    (appended where the title names no pair)."""
    pair, new_pair = f"{teacher} -> {student}", f"{new_teacher} -> {new_student}"
    return title.replace(pair, new_pair) if pair in title else f"{title}: {new_pair}"


def _apply_recipe(cfg: dict) -> None:
    """A configuration with "recipe": its image count, method options and distillation settings from that
    shipped recipe (the variant's defining options, such as `adversarial_weight`, are not in a recipe)."""
    from dfkd.common.recipes import load_recipe

    if cfg["recipe"] == "auto":   # the teacher's own choice (its architecture's input spec), as `synth generate` makes it
        from dfkd.common.models import create_model
        from dfkd.common.recipes import choose_recipe

        recipe = choose_recipe(create_model(cfg["teacher"]).input_spec)[0]
    else:
        recipe = load_recipe(cfg["recipe"])
    cfg["title"] += f" (the {recipe.name} recipe)"
    cfg.setdefault("images", recipe.synth["num_images"])   # a configuration's own budget wins (mnistm64: the CPU)
    own = cfg.get("options", {})   # the configuration's own values win (e.g. an equal-cost generator count)
    cfg["options"] = {method: {**recipe.method.get(method, {}), **own.get(method, {})}
                      for method in {*recipe.method, *own}}
    cfg.setdefault("distill_epochs", recipe.distill["epochs"])
    cfg["distill"] = {k.replace("_", "-"): v for k, v in recipe.distill.items() if k != "epochs"}
    cfg["shard_size"] = recipe.synth.get("shard_size", SHARD_SIZE)
    if recipe.synth.get("image_format", IMAGE_FORMAT) != IMAGE_FORMAT:
        raise SystemExit(f"recipe {recipe.name}: the benchmark writes {IMAGE_FORMAT} shards")


for _cfg in CONFIGS.values():
    if "recipe" in _cfg and _cfg["recipe"] != "auto":   # "auto" once the teacher is known (main: --teacher-arch)
        _apply_recipe(_cfg)


def say(text: str) -> None:
    with _print_lock:
        print(text, flush=True)


def run(cmd: list[str], log: Path, threads: int | None = None) -> tuple[float, float]:
    """Run a command line with its output in `log` (OMP threads: `threads`, default --threads); return (wall
    seconds, CPU seconds of the child)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    say("$ " + " ".join(shlex.quote(c) for c in cmd))
    threads = THREADS if threads is None else threads
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n--- last lines of {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-15:]))
    return wall, usage.ru_utime + usage.ru_stime


def slug(name: str) -> str:
    """A folder name for a method row: 'muse without CAM' -> 'muse-without-cam'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.csv ([] before its first epoch)."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def final_top1(run_dir: Path, epochs: int) -> float | None:
    """The last epoch's top-1 of a finished run (None while it is not): one that reached `epochs`, or that the
    stopping rule ended earlier (`--stop-patience`: its last row in the cool-down, and student.pt, the last file a
    run writes, is there)."""
    rows = _metrics(run_dir)
    if not rows:
        return None
    stopped = rows[-1].get("phase") == "cool-down" and (run_dir / "student.pt").is_file()
    if int(rows[-1]["epoch"]) < epochs and not stopped:
        return None
    return float(rows[-1]["eval_top1"])


def epochs_run(run_dir: Path) -> int | None:
    """The epochs a run trained (fewer than asked when the stopping rule ended it), or None without its metrics."""
    rows = _metrics(run_dir)
    return int(rows[-1]["epoch"]) if rows else None


def epochs_cell(row: dict) -> str:
    """The table's epochs: the configured number, or with runs that stopped early the epochs each seed ran of the
    cap (`7 / 8 of 20`)."""
    ran = [row.get("epochs_run", {})[s] for s in sorted(row.get("epochs_run", {}))]
    cap = row.get("epochs", "-")
    if all(n == cap for n in ran):
        return str(cap)
    return f"{' / '.join(map(str, ran))} of {cap}"


def teacher_top1(arch: str, path: Path, data_root: str, data: str = "mnist") -> float:
    import torch

    from dfkd.distill.datasets import ImageArrays, real_dataset
    from dfkd.common.models import create_model

    torch.set_num_threads(1)
    teacher = create_model(arch, weights=str(path)).eval()
    test = real_dataset(data, teacher.input_spec, train=False, root=data_root)
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 1000):
            index = torch.arange(i, min(i + 1000, len(test)))
            images, labels = test.batch(index) if isinstance(test, ImageArrays) else test[i:i + 1000]
            correct += (teacher(images).argmax(1) == labels).sum().item()
    return 100.0 * correct / len(test)


def write_real_shards(arch: str, teacher_path: Path, data: str, data_root: str, num_images: int, out: Path) -> None:
    """`num_images` of the dataset's real training images (a seeded subset, in order) with the teacher's logits,
    in the shard format: the real-data KD ceiling at the benchmark's image budget."""
    import numpy as np
    import torch

    from dfkd.distill.datasets import ImageArrays, real_dataset
    from dfkd.common.models import create_model, teacher_record
    from dfkd.common.shards import Sample, build_manifest, sample_key, shard_name, write_manifest, write_shard

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    teacher = create_model(arch, weights=str(teacher_path)).eval()
    spec = teacher.input_spec
    train = real_dataset(data, spec, train=True, root=data_root)
    if not isinstance(train, ImageArrays):
        raise SystemExit(f"the ceiling row needs a dataset held as uint8 arrays, not {data}")
    chosen = np.sort(np.random.default_rng(0).permutation(len(train))[:num_images])
    record = teacher_record(arch, str(teacher_path), teacher)
    config = {"method": f"real-{data}-train", "num_images": num_images, "teacher_sha256": record.weights_sha256}
    manifest = build_manifest(record, method=config["method"], config=config, image_format=IMAGE_FORMAT,
                              planned_samples=len(chosen), shard_size=SHARD_SIZE)
    for index, first in enumerate(range(0, len(chosen), SHARD_SIZE)):
        rows = torch.from_numpy(chosen[first:first + SHARD_SIZE])
        pixels = torch.from_numpy(np.take(np.asarray(train.images), rows.numpy(), axis=0))   # uint8 (B, C, H, W): CIFAR's a tensor
        inputs, labels = train.batch(rows)
        with torch.no_grad():
            logits = teacher(inputs).half().numpy()
        samples = (Sample(sample_key(first + i), pixels[i].permute(1, 2, 0).numpy(), int(labels[i]), logits[i], {})
                   for i in range(len(rows)))
        manifest.shards.append(write_shard(out / shard_name(index), samples, IMAGE_FORMAT))
    manifest.complete = True
    write_manifest(out, manifest)


def check_sets(sets: dict) -> None:
    """--set keys must name an option of some row's method (each row takes those its method has): any other key
    would change nothing, silently. Refused with the keys there are."""
    from dfkd.common.options import options_of
    from dfkd.synth.methods import METHODS

    known = {spec.name for method, _, _ in VARIANTS.values() if method in METHODS
             for spec in options_of(METHODS[method].Config)}
    unknown = sorted(set(sets) - known)
    if unknown:
        raise SystemExit(f"--set {', '.join(unknown)}: no row's method has such an option; the options are "
                         f"{', '.join(sorted(known))} (`synth methods` explains each)")


def variant_options(config_name: str, variant: str) -> tuple[str, dict]:
    """(method, --set options) of one row: the variant's base options, the configuration's (its recipe's) table for
    that method on top, then the variant's pinned options (what the row is about), then the configuration's own
    options for that row ("rows": e.g. the equal-cost generator count of one row)."""
    method, options, pinned = VARIANTS[variant]
    cfg = CONFIGS[config_name]
    return method, {**options, **cfg["options"].get(method, {}), **pinned, **cfg.get("rows", {}).get(variant, {})}


def distill_options(config_name: str) -> dict:
    """The `distill train` flags of a configuration's rows: {flag name: value}, epochs included."""
    cfg = CONFIGS[config_name]
    return {**DISTILL, **cfg.get("distill", {}), **DISTILL_SETS, "epochs": cfg["distill_epochs"]}


def check_finished_run(run_dir: Path, flags: dict) -> None:
    """A finished run is reused only if it was trained with these `distill train` flags (its config.json):
    a run of another recipe or --distill-set in the same --out must not fill this row."""
    saved_file = run_dir / "config.json"
    if not saved_file.exists():
        return
    saved = json.loads(saved_file.read_text())
    differ = []
    for flag, value in flags.items():
        key = flag.replace("-", "_")
        if key in ("threads", "workers") or key not in saved:
            continue
        mine = type(saved[key])(value) if isinstance(saved[key], (int, float, str)) else value
        if mine != saved[key]:
            differ.append(f"--{flag} {saved[key]} there, {value} here")
    if differ:
        raise SystemExit(f"{run_dir} was trained with other flags ({'; '.join(differ)}): give this invocation its own "
                         "--out, or the flags that run used (--images, --distill-epochs, --distill-set)")


def synth_seed_of(seed: int, paired: bool, method: str) -> int:
    """The synthesis seed behind distillation seed `seed`: 0 for every seed (one synthesis, the default), or the seed
    itself with --paired-seeds (each run its own synthesis). The ceiling's real images are one seeded subset."""
    return seed if paired and method != "real" else 0


def run_name(variant: str, seed: int, synth_seed: int) -> str:
    """A distillation's folder: '<row>-seed<S>', or '<row>-synth<K>-seed<S>' from another synthesis than seed 0's."""
    return f"{slug(variant)}-seed{seed}" if synth_seed == 0 else f"{slug(variant)}-synth{synth_seed}-seed{seed}"


def shards_folder(base: Path, source: str, synth_seed: int) -> Path:
    return base / "shards" / (slug(source) if synth_seed == 0 else f"{slug(source)}-synth{synth_seed}")


def synthesise(py: str, base: Path, config_name: str, source: str, synth_seed: int, data_root: str) -> dict:
    """One synthesis of a row (cached: its timing file is written last, so a rerun neither redoes nor re-times it)."""
    cfg = CONFIGS[config_name]
    method, options = variant_options(config_name, source)
    if SETS and method != "real":
        from dfkd.common.options import options_of
        from dfkd.synth.methods import METHODS

        known = {spec.name for spec in options_of(METHODS[method].Config)}
        options = {**options, **{k: v for k, v in SETS.items() if k in known}}
    shards = shards_folder(base, source, synth_seed)
    timing_file = shards / "bench_timing.json"
    if timing_file.exists():
        manifest = shards / "manifest.json"
        # the budget asked for (config.num_images): a ceiling's split may hold fewer images than that (planned_samples)
        written = json.loads(manifest.read_text()) if manifest.exists() else {}
        made = written.get("config", {}).get("num_images", written.get("planned_samples"))
        if made is not None and made != cfg["images"]:
            raise SystemExit(f"{shards} holds {made} images, this invocation asks for {cfg['images']}: "
                             "give each image budget its own --out (or the --images it was made with)")
        return json.loads(timing_file.read_text())
    log = base / "logs" / (f"synth-{slug(source)}.log" if synth_seed == 0 else f"synth-{slug(source)}-synth{synth_seed}.log")
    if method == "real":
        cmd = [py, str(Path(__file__).resolve()), "--write-real", cfg["teacher"], str(base / "teacher.pt"),
               cfg.get("data", "mnist"), data_root, str(cfg["images"]), str(shards)]
    else:
        # --recipe none: every row sets its own options (a recipe edit must not move this table)
        sets = [a for k, v in options.items() for a in ("--set", f"{k}={v}")]
        flags = [a for k, v in SYNTH_FLAGS.get(source, {}).items() for a in (f"--{k}", str(v))]
        cmd = [py, "-m", "dfkd.synth", "generate", "--teacher", cfg["teacher"], "--weights", str(base / "teacher.pt"),
               "--recipe", "none", "--method", method, *sets, *flags, "--num-images", str(cfg["images"]), "--shard-size",
               str(cfg.get("shard_size", SHARD_SIZE)), "--image-format", IMAGE_FORMAT, "--seed", str(synth_seed), "--threads", str(THREADS), "--quiet",
               "--out", str(shards)]
    # a folder with files from a stopped run: `synth generate` resumes it, and the child's CPU covers only the rest,
    # so the timing is not recorded (the row's synthesis and total columns stay empty, as for a resumed distillation)
    resumed = shards.is_dir() and any(shards.iterdir())
    wall, cpu = run(cmd, log)
    timing = {"wall_s": None, "cpu_s": None, "resumed": True} if resumed else {"wall_s": wall, "cpu_s": cpu}
    shards.mkdir(parents=True, exist_ok=True)
    timing_file.write_text(json.dumps(timing))
    return timing


def bench_variant(py: str, out: Path, config_name: str, variant: str, seeds: list[int], data_root: str,
                  synthesis_only: bool = False, paired: bool = False) -> dict:
    """Synthesise once (or, `paired`, once per seed with that seed), distil once per seed; finished steps are
    skipped on a rerun. The synthesis columns are the mean over the syntheses used."""
    cfg = CONFIGS[config_name]
    source, extra = STAGE_TWO_ROWS.get(variant, (variant, {}))
    method, _ = variant_options(config_name, source)
    base = out / config_name
    top1, timings = {}, {}
    epochs = max(1, round(cfg["distill_epochs"] * extra.get("epochs", 1.0)))   # a row's "epochs": a factor
    distill = {**distill_options(config_name), **{k: v for k, v in extra.items() if k != "epochs"},
               "epochs": epochs, "threads": THREADS}
    distill_args = [a for k, v in distill.items() for a in (f"--{k}", str(v))]
    distill_cpu, ran = {}, {}
    for seed in seeds:
        synth_seed = synth_seed_of(seed, paired, method)
        if synth_seed not in timings:
            timings[synth_seed] = synthesise(py, base, config_name, source, synth_seed, data_root)
        run_dir = base / "runs" / run_name(variant, seed, synth_seed)
        if final_top1(run_dir, epochs) is None and not synthesis_only:
            resume = (run_dir / "checkpoint.pt").exists()
            wall, cpu = run([py, "-m", "dfkd.distill", "train", "--shards", str(shards_folder(base, source, synth_seed)),
                             "--student", cfg["student"], "--out", str(run_dir), "--eval-data", cfg.get("data", "mnist"),
                             "--data-root", data_root, "--seed", str(seed), "--quiet", "--recipe", "none",
                             *distill_args, *(["--resume"] if resume else [])],
                            base / "logs" / f"distill-{run_name(variant, seed, synth_seed)}.log")
            # a resumed run's CPU covers only its last part: not recorded (the total column stays empty)
            if not resume:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "bench_timing.json").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu}))
        finished = final_top1(run_dir, epochs)
        if finished is not None:
            check_finished_run(run_dir, distill)
            top1[seed] = finished
            ran[seed] = epochs_run(run_dir) or epochs
            if (run_dir / "bench_timing.json").exists():
                distill_cpu[seed] = json.loads((run_dir / "bench_timing.json").read_text())["cpu_s"]
    say(f"done: {config_name} / {variant}: {top1}")
    # the mean over the syntheses, or None where one of them was resumed (its CPU was not measured whole)
    timing = {k: None if any(t[k] is None for t in timings.values()) else statistics.mean(t[k] for t in timings.values())
              for k in ("wall_s", "cpu_s")}
    return {"config": config_name, "method": variant, "images": cfg["images"], **timing, "top1": top1,
            "syntheses": len(timings), "epochs": epochs, "epochs_run": ran,
            "distill_cpu_s": statistics.mean(distill_cpu.values()) if distill_cpu else None}


def runs_on(config_name: str, row: str) -> bool:
    """Whether configuration `config_name` runs `row`: not in its "skip", in its "only" (a LISTED_ONLY row: named
    there), the ceiling only where it has one."""
    cfg = CONFIGS[config_name]
    if row in cfg.get("skip", []) or row not in cfg.get("only", [r for r in ROWS if r not in LISTED_ONLY]):
        return False
    return row != CEILING or bool(cfg.get("ceiling"))


def _after(before, fn, *args):
    """fn(*args) once the future `before` (None: nothing) is done: a stage-two row after its shards' synthesis.
    Without it in this invocation, bench_variant finds the row's shards (or synthesises them itself)."""
    if before is not None:
        before.result()
    return fn(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_methods")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--seeds", type=int, default=3, help="distillation seeds per method (0 .. N-1)")
    parser.add_argument("--seed-list", default=None, metavar="S,S",
                        help="run only these seeds (e.g. 2 or 1,2: two invocations share the seeds of a row; the "
                        "table shows the seeds run here, a later --seeds N invocation gathers them all)")
    parser.add_argument("--jobs", type=int, default=2, help="commands run at once (one thread each)")
    parser.add_argument("--configs", default=",".join(c for c in CONFIGS if not CONFIGS[c].get("separate")),
                        help="comma-separated subset of " + ",".join(CONFIGS) + " (default: all but the longer "
                        + ", ".join(c for c in CONFIGS if CONFIGS[c].get("separate")) + ")")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the method rows (by slug)")
    parser.add_argument("--ceiling-seeds", type=int, default=None, metavar="N",
                        help="the real-data ceiling's row runs only the first N of the seeds (its spread over "
                        "distillation seeds is small; the CPU goes to the data-free rows)")
    parser.add_argument("--paired-seeds", action="store_true",
                        help="seed S also synthesises its own shards with --seed S (default: one synthesis, seed 0, "
                        "for every distillation seed): the spread then covers both stages")
    parser.add_argument("--synthesis-only", action="store_true",
                        help="only synthesise (timings); the table shows the distillations already finished")
    parser.add_argument("--images", type=int, default=None,
                        help="images per row instead of each configuration's own (a new --out: finished rows are reused)")
    parser.add_argument("--distill-epochs", type=int, default=None,
                        help="distillation epochs instead of each configuration's own (a new --out)")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help="teacher training epochs instead of each configuration's own (a new --out)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option for every row whose method has it, over the row's own (dry runs: "
                        "steps=2; a new --out)")
    parser.add_argument("--distill-set", dest="distill_sets", action="append", default=[], metavar="FLAG=VALUE",
                        help="a `distill train` flag for every row, over the configuration's own (e.g. aug=crop-colour; "
                        "a stage-two row's own flags still win; a new --out)")
    parser.add_argument("--teacher-arch", default=None, metavar="NAME",
                        help="the teacher architecture of every configuration instead of its own (e.g. cifar_resnet34 "
                        "with --configs mnistm32-papers; a new --out)")
    parser.add_argument("--student-arch", default=None, metavar="NAME",
                        help="the student architecture instead of each configuration's own (a new --out)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every command (GPU machines: more)")
    parser.add_argument("--write-real", nargs=6, metavar=("ARCH", "TEACHER", "DATA", "DATA_ROOT", "N", "OUT"),
                        help=argparse.SUPPRESS)  # the ceiling row's shards, run as a child (for its rusage)
    parser.add_argument("--results", default=None, metavar="FILE",
                        help="also write the tables, headed with date, machine, commit and command, into FILE "
                        "(e.g. results/mnistm32.md; notes below its generated part are kept)")
    args = parser.parse_args()
    if args.write_real:
        arch, weights, data, data_root, n, shards = args.write_real
        write_real_shards(arch, Path(weights), data, data_root, int(n), Path(shards))
        return
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    variants = ROWS if not args.variants else [v for v in ROWS if slug(v) in args.variants.split(",")]
    global THREADS
    THREADS = args.threads
    for item in args.sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        SETS[key.strip()] = value.strip()
    for item in args.distill_sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--distill-set expects FLAG=VALUE, got {item!r}")
        DISTILL_SETS[key.strip().replace("_", "-")] = value.strip()
    check_sets(SETS)
    if args.variants:   # a row asked for by name runs somewhere, or the command says why not
        asked = [x for x in args.variants.split(",") if x]
        unknown = [x for x in asked if x not in {slug(v) for v in ROWS}]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; choose from {[slug(v) for v in ROWS]}")
        idle = [slug(v) for v in variants if not any(runs_on(c, v) for c in configs)]
        if idle:
            raise SystemExit(f"variant(s) {idle} run on none of the configurations {configs} (their skip / only "
                             "lists in CONFIGS); choose another --configs or add the row to the configuration's list")
    for name in configs:
        cfg = CONFIGS[name]
        if args.teacher_arch or args.student_arch:
            teacher, student = args.teacher_arch or cfg["teacher"], args.student_arch or cfg["student"]
            cfg["title"] = retitled(cfg["title"], cfg["teacher"], cfg["student"], teacher, student)
            cfg["teacher"], cfg["student"] = teacher, student
        if cfg.get("recipe") == "auto":
            _apply_recipe(cfg)
    for name in configs:   # budgets given on the command line (a GPU's, or a dry run's) win over the table's
        for key, value in (("images", args.images), ("distill_epochs", args.distill_epochs),
                           ("teacher_epochs", args.teacher_epochs)):
            if value is not None:
                CONFIGS[name][key] = value
    seeds = list(range(args.seeds)) if args.seed_list is None else [int(x) for x in args.seed_list.split(",") if x]
    py, started = sys.executable, time.perf_counter()

    with ThreadPoolExecutor(args.jobs) as pool:
        teachers = {}
        for name in configs:
            path = out / name / "teacher.pt"
            if not path.exists():
                cfg = CONFIGS[name]
                teachers[name] = pool.submit(run, [py, "-m", "dfkd.distill", "teacher", "--model", cfg["teacher"],
                                                   "--data", cfg.get("data", "mnist"), "--data-root",
                                                   args.data_root, "--epochs",
                                                   str(cfg["teacher_epochs"]), "--seed", "0", "--threads", str(THREADS),
                                                   *(["--resolution", str(cfg["resolution"])] if "resolution" in cfg else []),
                                                   *cfg.get("teacher_args", []),
                                                   "--quiet", "--out", str(path)], out / name / "logs" / "teacher.log")
        for f in teachers.values():
            f.result()
        # the last (slowest) configuration first, so that the job slots run out of work together; a stage-two row
        # after the rows it reuses (it waits for that synthesis: FIFO slots, so the one it waits for has started)
        submitted = {}
        for c in reversed(configs):
            for v in sorted(variants, key=lambda v: v in STAGE_TWO_ROWS):
                if not runs_on(c, v):
                    continue
                source = submitted.get((c, STAGE_TWO_ROWS[v][0])) if v in STAGE_TWO_ROWS else None
                row_seeds = seeds[:args.ceiling_seeds] if v == CEILING and args.ceiling_seeds else seeds
                submitted[c, v] = pool.submit(_after, source, bench_variant, py, out, c, v, row_seeds, args.data_root,
                                              args.synthesis_only, args.paired_seeds)
        rows = sorted((j.result() for j in submitted.values()), key=lambda r: (configs.index(r["config"]),
                                                                              ROWS.index(r["method"])))
    for name in configs:
        acc = teacher_top1(CONFIGS[name]["teacher"], out / name / "teacher.pt", args.data_root,
                           CONFIGS[name].get("data", "mnist"))
        for r in rows:
            if r["config"] == name:
                r["teacher_top1"] = acc
    write_results(out, rows, time.perf_counter() - started, args.jobs, args.paired_seeds)
    if args.results:
        from results_header import write_results_file
        write_results_file(args.results, (out / "results.md").read_text(), title="Synthesis methods side by side")


def _cell(value: float | None, fmt: str, missing: str = "") -> str:
    """A number for a table cell, or `missing` where it was not measured (a resumed step's CPU)."""
    return missing if value is None else format(value, fmt)


def write_results(out: Path, rows: list[dict], seconds: float, jobs: int, paired: bool = False) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config", "method", "images", "synthesis_cpu_s", "synthesis_wall_s", "images_per_cpu_s",
                    "student_top1_mean", "student_top1_std", "student_top1_per_seed", "teacher_top1",
                    "distill_epochs", "distill_cpu_s", "total_cpu_s", "distill_epochs_run"])
        for r in rows:
            accs = [r["top1"][s] for s in sorted(r["top1"])] or [float("nan")]
            dcpu, scpu = r.get("distill_cpu_s"), r["cpu_s"]
            w.writerow([r["config"], r["method"], r["images"], _cell(scpu, ".1f"), _cell(r["wall_s"], ".1f"),
                        _cell(scpu and r["images"] / scpu, ".1f"), f"{statistics.mean(accs):.2f}",
                        f"{statistics.stdev(accs) if len(accs) > 1 else 0:.2f}",
                        " ".join(f"{a:.2f}" for a in accs), f"{r['teacher_top1']:.2f}", r.get("epochs", ""),
                        _cell(dcpu, ".1f"), _cell(None if dcpu is None or scpu is None else scpu + dcpu, ".1f"),
                        " ".join(str(r.get("epochs_run", {})[s]) for s in sorted(r.get("epochs_run", {})))])
    lines = []
    for name in dict.fromkeys(r["config"] for r in rows):
        sub = [r for r in rows if r["config"] == name]
        by = {r["method"]: r for r in sub}
        # with a ceiling row: each row's mean as a fraction of the ceiling's mean, same run (the measure the MNIST-M tables report)
        ceiling = [by[CEILING]["top1"][s] for s in sorted(by[CEILING]["top1"])] if CEILING in by else []
        lines += [f"### {CONFIGS[name]['title']} (teacher top-1 {sub[0]['teacher_top1']:.2f}%)", "",
                  "| method | images | synthesis CPU-s | synthesis wall-s | images / CPU-s | epochs | distillation "
                  "CPU-s | total CPU-s | student top-1 (%), mean +- std over seeds | per seed |"
                  + (" x ceiling |" if ceiling else ""),
                  "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if ceiling else "")]
        for r in sub:
            accs = [r["top1"][s] for s in sorted(r["top1"])]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            top1 = f"{statistics.mean(accs):.2f} +- {std:.2f} ({len(accs)})" if accs else "not distilled"
            ratio = (f" {statistics.mean(accs) / statistics.mean(ceiling):.3f} |" if accs else " |") if ceiling else ""
            dcpu, scpu = r.get("distill_cpu_s"), r["cpu_s"]
            total = None if dcpu is None or scpu is None else scpu + dcpu
            lines.append(f"| {r['method']} | {r['images']:,} | {_cell(scpu, '.0f', '-')} | {_cell(r['wall_s'], '.0f', '-')} | "
                         f"{_cell(scpu and r['images'] / scpu, '.1f', '-')} | {epochs_cell(r)} | {_cell(dcpu, '.0f', '-')} | "
                         f"{_cell(total, '.0f', '-')} | {top1} | " + " / ".join(f"{a:.2f}" for a in accs)
                         + " |" + ratio)
        low, full = by.get("muse low-resolution only (3 x 1/4)"), by.get("muse without multi-resolution (3 x full)")
        if low and full and low["cpu_s"] and full["cpu_s"]:
            lines += ["", f"Low-resolution cost: MUSE at 1/4 resolution used {low['cpu_s']:.0f} CPU-s against "
                      f"{full['cpu_s']:.0f} CPU-s at full resolution for the same images and steps: "
                      f"**{100 * low['cpu_s'] / full['cpu_s']:.0f}%**."]
        lines.append("")
    lines.append("Seeds: " + ("each seed S is its own synthesis (`--seed S`) and distillation (`--seed S`); the "
                 "synthesis columns are the mean over those syntheses (the ceiling's real images are one subset)."
                 if paired else "one synthesis (seed 0); the seeds vary the distillation only."))
    lines.append("")
    lines.append(f"Wall time of this invocation: {seconds / 60:.1f} min with {jobs} jobs at once "
                 "(finished steps are skipped on a rerun).")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
