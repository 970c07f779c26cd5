"""Stage-one speed against its own compute limit, per method, on the machine at hand.

    bash pipelines/bench_synthesis.sh                       # sets up .venv, then the CPU cases
    python pipelines/bench_synthesis.py --out runs/bench_synthesis [--only resnet18@64] [--threads 2]
    python pipelines/bench_synthesis.py --only resnet50@224 --device cuda     # the GPU case (bf16, channels-last)
    python pipelines/bench_synthesis.py --only resnet50@224 --device cuda --compile   # the same, torch.compile

For each method (generator ensemble, MUSE, DeepInversion) and case (teacher, input size, batch shape),
every measurement runs the library's own code and is set next to its limit, measured in the same run
on the same batch shape (the two take turns, --repeats times; each reports its median):

  training   generator training images/s: `GeneratorEnsemble._train` (all hooks, loss terms, optimiser
             steps; checkpoints excluded), i.e. K generators x batch images per step;
             limit: the step's compute alone: generator forward + backward plus the teacher's forward +
             backward to its input, on the same K x batch images, no hooks, losses or optimiser. The
             teacher's share of the limit (teacher forward + backward alone) is printed: no method can
             avoid it. DeepInversion has no generator: its "training" is the per-batch pixel
             optimisation (image-iterations/s), its limit the teacher's forward + backward alone.
  writing    shard-writing images/s: `synth.writer.write_shard` over `synth.generate.shard_batches`
             (synthesis, 8-bit pixels, teacher logits, PNG encoding, tar, sha256, a real file), with
             `--write-workers` encoder processes; limit: synthesis + teacher forward alone on the same
             batches (encoding, hashing and I/O are what the pool must hide).
  where the time goes: the cost of the BN-statistics terms alone (the limit's step with the per-generator
             BN hooks and their gradient, over the limit), and PNG encoding + tar members in one process.

Teachers have random weights (cost does not depend on the weights). On a GPU the table adds the
projected GPU-hours to synthesise 1.28M images with the imagenet recipe's settings.
Results: a markdown table on stdout and in <out>/results.md, the numbers in <out>/results.csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from dfkd.synth.bn_stats import BNStatsLoss


@dataclass(frozen=True)
class Case:
    teacher: str
    size: int
    device: str
    gen_batch: int            # images per generator per training step
    generators: int           # K: generators of the ensemble (MUSE: one per resolution, 3 streams)
    write_batch: int          # --write-batch-size when writing
    write_images: int         # images written per measurement
    di_iterations: int        # DeepInversion iterations per measured batch
    di_low_res: bool = True   # writing adds the half-resolution phase (twice as many iterations), if the teacher
                              # takes half-size inputs (LeNet-5 does not)
    amp: str = "none"
    channels_last: bool = False
    options: dict = field(default_factory=dict)   # extra method options (all methods)
    muse_options: dict = field(default_factory=dict)


CASES = {
    "lenet5@28": Case("lenet5", 28, "cpu", gen_batch=64, generators=4, write_batch=500, write_images=2000,
                      di_iterations=10, di_low_res=False),
    "resnet18@64": Case("resnet18", 64, "cpu", gen_batch=32, generators=2, write_batch=100, write_images=400,
                        di_iterations=3),
    "resnet50@224": Case("resnet50", 224, "cuda", gen_batch=64, generators=8, write_batch=256, write_images=4096,
                         di_iterations=20, amp="bf16", channels_last=True, options={"width": "64"},
                         muse_options={"teacher_input": "native"}),
}
CPU_CASES = ("lenet5@28", "resnet18@64")
METHODS = ("generator", "muse", "deepinversion")
WARMUP_STEPS = 2
# The imagenet recipe's settings (common/recipes/imagenet.toml), for the projection (1.28M images).
PROJECT_IMAGES = 1_281_167
PROJECT = {"generator": {"generators": 8, "steps": 5000, "batch": 64},
           "muse": {"generators": 3, "steps": 5000, "batch": 64},
           "deepinversion": {"batch": 84, "iterations": 1000, "low_res_iterations": 2000}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(case: Case, method_name: str, steps: int, compute):
    """Teacher and method for `case`, as `synth generate` builds them."""
    from dfkd.common.models import create_model
    from dfkd.synth.methods import method_from_options

    torch.manual_seed(0)
    teacher = create_model(case.teacher, weights="none", input_size=case.size).eval().requires_grad_(False)
    spec = teacher.input_spec
    teacher = compute.model(teacher)
    options = dict(case.options)
    if method_name == "deepinversion":
        options = {"iterations": str(case.di_iterations),
                   "low_res_iterations": str(2 * case.di_iterations if case.di_low_res else 0)}
    else:
        options.update(train_batch_size=str(case.gen_batch), steps=str(steps), checkpoint_every="100000")
        options["num_generators"] = str(case.generators) if method_name == "generator" else "1"
        if method_name == "muse":
            options.update(case.muse_options)
    return teacher, method_from_options(method_name, options, spec, 1000, compute)


# --------------------------------------------------------------------------- training
def time_training(case, method_name, compute, steps: int, state: Path) -> float:
    """Images/s of the method's own training loop over `steps` steps after WARMUP_STEPS."""
    teacher, method = build(case, method_name, WARMUP_STEPS + steps + 1, compute)
    if method_name == "deepinversion":
        return time_deepinversion(case, teacher, method, compute)
    method.check_teacher(teacher)
    state.mkdir(parents=True, exist_ok=True)
    members = [method._member(k, state / f"g{k}.pt", 0) for k in range(method.num_streams)]
    starts = []
    original = method._forward_backward

    def timed(part, *args):
        if part[0] is members[0]:   # the first teacher pass of a step: the step starts
            sync(compute.device)
            starts.append(time.perf_counter())
        return original(part, *args)
    method._forward_backward = timed
    method._train(members, teacher, False, 0)
    seconds = starts[WARMUP_STEPS + steps] - starts[WARMUP_STEPS]
    return steps * method.num_streams * case.gen_batch / seconds


def time_training_limit(case, method_name, compute, steps: int) -> tuple[float, float, float]:
    """(images/s of generator fwd + bwd and teacher fwd + bwd-to-input alone, the teacher's share of it,
    the extra time of the same step with the BN-statistics terms as a fraction of it)."""
    teacher, method = build(case, method_name, 1, compute)
    spec, b = method.spec, case.gen_batch
    if method_name == "deepinversion":
        x = torch.randn(b, spec.channels, case.size, case.size, device=compute.device)
        per = _time(lambda: _teacher_pass(teacher, x.requires_grad_(True), compute), steps, compute)
        with BNStatsLoss(teacher) as bn:
            per_bn = _time(lambda: _teacher_pass(teacher, x, compute, bn), steps, compute)
        return b / per, 1.0, per_bn / per - 1
    gens = [method._member(k, Path(tempfile.gettempdir()) / "unused.pt", 0).gen.train()
            for k in range(method.num_streams)]
    labels = (torch.arange(b) % spec.num_classes).to(compute.device)
    zs = [torch.randn(b, method.config.latent_dim, device=compute.device) for _ in gens]
    sizes = [method._view_size(k) for k in range(len(gens))]

    def step(bn=None):
        views = {}
        for k, gen in enumerate(gens):
            with compute.autocast():
                views.setdefault(sizes[k], []).append(method._render(k, gen, zs[k], labels, None)[1].float())
        for group in views.values():
            _teacher_pass(teacher, torch.cat(group), compute, bn)
        for gen in gens:
            gen.zero_grad(set_to_none=True)

    per_step = _time(step, steps, compute)
    leaves = [torch.rand(len(group) * b, spec.channels, s, s, device=compute.device, requires_grad=True)
              for s, group in _groups(sizes).items()]
    per_teacher = _time(lambda: [_teacher_pass(teacher, x, compute) for x in leaves], steps, compute)
    with BNStatsLoss(teacher) as bn:   # the same step with the BN-statistics term (per generator): its cost
        bn.chunks = len(gens) if len(set(sizes)) == 1 else 1
        per_step_bn = _time(lambda: step(bn), steps, compute)
    return len(gens) * b / per_step, per_teacher / per_step, per_step_bn / per_step - 1


def _groups(sizes):
    out: dict[int, list] = {}
    for k, s in enumerate(sizes):
        out.setdefault(s, []).append(k)
    return out


def _teacher_pass(teacher, x, compute, bn=None):
    with compute.autocast():
        logits = teacher(compute.batch(teacher.input_spec.normalize(x)))
    loss = logits.float().square().mean()
    (loss if bn is None else loss + bn.loss().sum()).backward()


def _time(fn, repeats: int, compute) -> float:
    """Seconds per call of fn, after one warm-up call."""
    fn()
    sync(compute.device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(compute.device)
    return (time.perf_counter() - start) / repeats


def time_deepinversion(case, teacher, method, compute) -> float:
    """Image-iterations/s of DeepInversion's optimisation of one full-size batch (no low-res phase)."""
    from dataclasses import replace

    method.config = replace(method.config, low_res_iterations=0)
    method.fit(teacher, Path(tempfile.gettempdir()))
    b = case.gen_batch
    labels = torch.arange(b) % method.spec.num_classes
    method.synthesize(labels, torch.zeros(b, dtype=torch.long), torch.Generator().manual_seed(0))  # warm-up
    sync(compute.device)
    start = time.perf_counter()
    method.synthesize(labels, torch.zeros(b, dtype=torch.long), torch.Generator().manual_seed(1))
    sync(compute.device)
    return b * case.di_iterations / (time.perf_counter() - start)


# --------------------------------------------------------------------------- writing
def writing_setup(case, method_name, compute, state: Path):
    from dfkd.synth.generate import GenerateConfig, teacher_logits_fn

    teacher, method = build(case, method_name, 1, compute)
    method.fit(teacher, state, progress=False, seed=0)
    cfg = GenerateConfig(teacher=case.teacher, method=method_name, write_batch_size=case.write_batch,
                         num_images=case.write_images, shard_size=case.write_images)
    return cfg, method, teacher_logits_fn(teacher, compute)


def time_writing(setup, workers: int, out: Path, compute) -> float:
    from dfkd.synth.generate import shard_batches
    from dfkd.synth.methods.base import seeded_generator
    from dfkd.synth.writer import WriterPool, write_shard

    cfg, method, logits_of = setup
    with WriterPool(workers) as pool:
        if workers:  # start the processes outside the timing (once per run in `synth generate`)
            for job in [pool.submit(abs, i) for i in range(workers)]:
                job.result()
        sync(compute.device)
        start = time.perf_counter()
        write_shard(out, shard_batches(cfg, method, seeded_generator(0, 0), range(cfg.num_images)), logits_of,
                    method.labels_from_teacher, "png", pool)
        seconds = time.perf_counter() - start
    out.unlink()
    return cfg.num_images / seconds


def time_writing_limit(setup, compute) -> float:
    from dfkd.synth.generate import shard_batches
    from dfkd.synth.methods.base import seeded_generator

    cfg, method, logits_of = setup
    sync(compute.device)
    start = time.perf_counter()
    for batch in shard_batches(cfg, method, seeded_generator(0, 0), range(cfg.num_images)):
        logits_of(batch.pixels).argmax(1).cpu()
    sync(compute.device)
    return cfg.num_images / (time.perf_counter() - start)


def time_encoding(setup, compute) -> float:
    """Images/s of PNG encoding + tar members in this process (what the pool does)."""
    import numpy as np

    from dfkd.common.shards import encode_segment
    from dfkd.synth.generate import shard_batches
    from dfkd.synth.methods.base import seeded_generator

    cfg, method, logits_of = setup
    batch = next(shard_batches(cfg, method, seeded_generator(0, 0), range(min(cfg.num_images, cfg.write_batch_size))))
    host = batch.pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    logits = np.zeros((len(batch.keys), method.spec.num_classes), np.float16)
    start = time.perf_counter()
    encode_segment(batch.keys, host, batch.labels.tolist(), logits, batch.metas, "png")
    return len(batch.keys) / (time.perf_counter() - start)


# --------------------------------------------------------------------------- the run
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/bench_synthesis")
    parser.add_argument("--only", action="append", choices=sorted(CASES), help="cases to run (repeatable)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default=None, help="override the case's device (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the usable cores)")
    parser.add_argument("--workers", default=None,
                        help="comma-separated --write-workers to time (default: 0 and synth's default)")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=None, metavar="FILE",
                        help="also write the tables, headed with date, machine, commit and command, into FILE")
    parser.add_argument("--write-images", type=int, default=None,
                        help="images written per writing measurement instead of the case's own")
    parser.add_argument("--compile", action="store_true", help="torch.compile teacher and generators "
                        "(synth generate --compile; the first steps compile, outside the timing)")
    args = parser.parse_args()

    from dfkd.common.accel import Compute, check_amp, resolve_device
    from dfkd.common.distributed import usable_cores
    from dfkd.synth.writer import default_workers

    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    cases = args.only or list(CPU_CASES)
    workers = ([int(w) for w in args.workers.split(",")] if args.workers
               else sorted({0, 1, default_workers(usable_cores(), resolve_device(args.device or "cpu"))}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    started, load_before = time.perf_counter(), os.getloadavg()
    for name in cases:
        case = CASES[name]
        if args.write_images:
            case = replace(case, write_images=args.write_images)
        device = resolve_device(args.device or case.device)
        check_amp(case.amp, device)
        compute = Compute(device, case.amp, case.channels_last, args.compile)
        for method_name in args.methods.split(","):
            samples: dict[str, list] = {}
            with tempfile.TemporaryDirectory() as tmp:
                setup = writing_setup(case, method_name, compute, Path(tmp) / "state")
                for r in range(args.repeats):   # actual and limit take turns
                    samples.setdefault("train", []).append(
                        time_training(case, method_name, compute, args.steps, Path(tmp) / f"t{r}"))
                    limit, share, bn_cost = time_training_limit(case, method_name, compute, args.steps)
                    samples.setdefault("train_limit", []).append(limit)
                    samples.setdefault("teacher_share", []).append(share)
                    samples.setdefault("bn_hooks_cost", []).append(bn_cost)
                    for w in workers:
                        samples.setdefault(f"write_{w}", []).append(
                            time_writing(setup, w, Path(tmp) / "shard.tar", compute))
                    samples.setdefault("write_limit", []).append(time_writing_limit(setup, compute))
                    samples.setdefault("encode", []).append(time_encoding(setup, compute))
            row = {"case": name, "method": method_name, "device": str(device), "threads": threads,
                   "compile": args.compile,
                   **{k: statistics.median(v) for k, v in samples.items()}}
            rows.append(row)
            print(f"{name} {method_name}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()
                                                        if isinstance(v, float)), flush=True)
    write_results(out, rows, workers, args, threads, load_before, os.getloadavg(), time.perf_counter() - started)


def projected_hours(row: dict, workers: list[int]) -> tuple[float, float] | None:
    """(synthesis hours, writing hours) for 1.28M images with the imagenet recipe's settings (GPU rows)."""
    if not row["device"].startswith("cuda"):
        return None
    p, write = PROJECT[row["method"]], max(row[f"write_{w}"] for w in workers)
    if row["method"] == "deepinversion":
        # measured: full-size image-iterations/s; the low-res phase costs about a quarter per iteration
        per_image = (p["iterations"] + p["low_res_iterations"] / 4) / row["train"]
        return PROJECT_IMAGES * per_image / 3600, PROJECT_IMAGES / write / 3600
    return p["generators"] * p["steps"] * p["batch"] / row["train"] / 3600, PROJECT_IMAGES / write / 3600


def write_results(out, rows, workers, args, threads, load_before, load_after, seconds) -> None:
    wcols = " | ".join(f"write img/s ({w} workers) | / limit" for w in workers)
    lines = [f"Stage-one speed against its compute limit; torch {torch.__version__}, {threads} threads, "
             f"{'torch.compile (the limits run eager), ' if args.compile else ''}"
             f"{args.steps} timed steps, median of {args.repeats}; load average before {load_before[0]:.2f}, "
             f"after {load_after[0]:.2f}; {seconds / 60:.1f} min.", "",
             f"| case | method | train img/s | train limit img/s | train / limit | teacher share of limit | "
             f"BN-statistics terms, cost over the limit | "
             f"{wcols} | write limit img/s | PNG encode img/s (1 process) |",
             "|---|---|---|---|---|---|---|" + "---|---|" * len(workers) + "---|---|"]
    for r in rows:
        w = " | ".join(f"{r[f'write_{n}']:.0f} | {r[f'write_{n}'] / r['write_limit']:.2f}" for n in workers)
        lines.append(f"| {r['case']} ({r['device']}) | {r['method']} | {r['train']:.0f} | {r['train_limit']:.0f} | "
                     f"**{r['train'] / r['train_limit']:.2f}** | {r['teacher_share']:.2f} | "
                     f"+{100 * r['bn_hooks_cost']:.0f}% | {w} | "
                     f"{r['write_limit']:.0f} | {r['encode']:.0f} |")
    projections = [(r, projected_hours(r, workers)) for r in rows]
    if any(p for _, p in projections):
        lines += ["", "Projected GPU-hours for 1.28M images (the imagenet recipe's settings):", "",
                  "| method | synthesis (training / optimisation) h | writing h | total h |", "|---|---|---|---|"]
        for r, p in projections:
            if p:
                lines.append(f"| {r['method']} | {p[0]:.1f} | {p[1]:.1f} | {p[0] + p[1]:.1f} |")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    if args.results:
        from results_header import write_results_file
        write_results_file(args.results, text, title="Stage-one speed against its compute limit")
    keys = sorted({k for r in rows for k in r})
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print("\n" + text)


if __name__ == "__main__":
    main()
