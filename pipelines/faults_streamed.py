"""A 2-rank `distill train` (torchrun, gloo on the CPU) streaming its shards over HTTP from a server that injects
network faults (pipelines/fault_server.py: dropped and cut-short transfers, 503s, stalls past the read
timeout, reset connections), against the same training from the local files: the students must be
bit-identical. Writes the counts and the verdict to results/faults.md.

    python pipelines/faults_streamed.py                        # at least 20 faults, results/faults.md
    python pipelines/faults_streamed.py --rate 0.7 --epochs 6 --work /tmp/faults --results ''

The shards: lenet5 with random weights (BN statistics from noise) labelling Gaussian noise (`--method
noise`), 8 shards of 40 images; the student lenet5_half, `--epochs` epochs, EMA and mixup, 1 DataLoader
worker per rank. Each GET of a shard gets a fault with probability `--rate` (at most 2 in a row per file,
so that the default 6 attempts get through); waits between attempts are the real ones (1 s, 2 s, ...).
"""
from __future__ import annotations

import argparse
import collections
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dfkd.common.models import create_model, load_model_checkpoint, save_model_checkpoint
from dfkd.synth.generate import GenerateConfig, generate
from fault_server import TRANSIENT_KINDS, FaultServer, random_plan
from results_header import ROOT, write_results_file

TRAIN = ["--student", "lenet5_half", "--batch-size-per-rank", "16", "--workers", "1", "--ema-decay", "0.9",
         "--mixup", "0.2", "--val-shards", "none", "--quiet", "--threads", "1"]


def make_shards(work: Path) -> Path:
    teacher = work / "teacher.pt"
    torch.manual_seed(0)
    model = create_model("lenet5")
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, 1, 28, 28) * 0.8 - 0.2)
    save_model_checkpoint(teacher, model.eval())
    shards = work / "shards"
    generate(GenerateConfig(teacher="lenet5", weights=str(teacher), out=str(shards), method="noise", num_images=320,
                            shard_size=40, write_batch_size=40, val_images=0, progress=False))
    return shards


def torchrun(shards: str, out: Path, epochs: int, extra: list[str]) -> tuple[float, str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "dfkd.distill", "train", "--shards", shards, "--out", str(out), "--epochs", str(epochs), *TRAIN, *extra]
    started = time.perf_counter()
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"the training into {out} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - started, proc.stderr


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in csv.DictReader(f)]


def identical(run: Path, reference: Path) -> dict[str, bool]:
    """Per file: the same tensors bit for bit (students), the same rows without the timings (logs)."""
    verdict = {}
    for name in ("student.pt", "student_ema.pt"):
        got, want = (load_model_checkpoint(r / name)["state_dict"] for r in (run, reference))
        verdict[name] = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    for name in ("metrics.csv", "steps.csv"):
        verdict[name] = rows(run / name) == rows(reference / name)
    return verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="working folder [default: a temporary one]")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.6, help="probability of a fault per GET of a shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault plan")
    parser.add_argument("--read-timeout", type=float, default=1.0, help="--shard-read-timeout of the streamed run")
    # the plan caps the faults in a row per shard, not per reader: with several readers of one shard at once (ranks,
    # workers, the read-ahead that fills the shuffle buffer) one reader can meet more than the cap in a row
    parser.add_argument("--attempts", type=int, default=20, help="--shard-attempts of the streamed run")
    parser.add_argument("--min-faults", type=int, default=20, help="fail unless at least this many were injected")
    parser.add_argument("--results", default=str(ROOT / "results" / "faults.md"), help="results file ('' for none)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="faults-streamed-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        shards = make_shards(work)
        local_s, _ = torchrun(str(shards), work / "local", args.epochs, [])
        with FaultServer(shards, random_plan(args.seed, args.rate), stall_s=3 * args.read_timeout) as server:
            streamed_s, stderr = torchrun(server.url + "/", work / "streamed", args.epochs,
                                          ["--shard-read-timeout", str(args.read_timeout),
                                           "--shard-attempts", str(args.attempts)])
        verdict = identical(work / "streamed", work / "local")
        retries = sum("retrying from its start" in line for line in stderr.splitlines())
        injected, gets = collections.Counter(server.injected), sum(server.requests.values())
        shard_gets = sum(n for name, n in server.requests.items() if name.endswith(".tar"))

    same = all(verdict.values())
    print(f"{sum(injected.values())} faults injected ({dict(injected)}) in {shard_gets} GETs of shards; "
          f"{retries} retries reported; bit-identical: {'yes' if same else 'no'} {verdict}")
    table = "\n".join([
        "2-rank `distill train` (torchrun, gloo, CPU) streaming 8 shards from the fault-injecting server, against the "
        "same command on the local folder.",
        "",
        "| fault injected | count |", "|---|---|",
        *(f"| {kind} | {injected.get(kind, 0)} |" for kind in TRANSIENT_KINDS),
        f"| **all** | **{sum(injected.values())}** |",
        "",
        "| | value |", "|---|---|",
        f"| GETs served (shards) | {gets} ({shard_gets}) |",
        f"| retries reported on stderr | {retries} |",
        f"| epochs, fault rate per GET, read timeout, attempts | {args.epochs}, {args.rate}, {args.read_timeout:g} s, "
        f"{args.attempts} |",
        f"| wall time, local files | {local_s:.1f} s |",
        f"| wall time, streamed with faults | {streamed_s:.1f} s |",
        *(f"| {name} identical | {'yes' if ok else 'no'} |" for name, ok in verdict.items()),
        f"| **student bit-identical to the local run** | **{'yes' if same else 'no'}** |",
    ])
    if args.results:
        write_results_file(args.results, table, title="Faults: streamed shards through a fault-injecting server")
    if not same or sum(injected.values()) < args.min_faults:
        sys.exit(f"failed: {sum(injected.values())} faults (at least {args.min_faults} wanted), identical: {same}")


if __name__ == "__main__":
    main()
