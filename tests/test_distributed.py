"""Stage two as 2-process jobs on the CPU (gloo): torchrun on the command line, plus spawned ranks
for what needs a monkeypatch (an interruption); the rank split of the shards; torchrun's elastic restarts
after one rank is SIGKILLed at a random time (`--max-restarts`: the run continues without flags and ends
identical to an undisturbed run). Stage one's 2-rank tests, with the same helpers: test_distributed_synth.py.

The random kills: one job per stage with ELASTIC_KILLS kills in CI; more for a longer chaos run (each kill
costs a restart, about 5 s of interpreter start-up on 2 busy cores), which prints what each kill hit:
    DFKD_ELASTIC_TRIALS=4 DFKD_ELASTIC_KILLS=3 DFKD_ELASTIC_SEED=1 python -m pytest tests/test_distributed*.py -s -k killed
"""
from __future__ import annotations

import contextlib
import csv
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dfkd.common.models import load_model_checkpoint
from dfkd.common.errors import UserError
from dfkd.common.shards import read_manifest
from dfkd.distill.data import ShardLoader
from dfkd.synth.generate import GenerateConfig, generate

REPO = Path(__file__).resolve().parents[1]
TINY_GENERATORS = {"num_generators": "3", "steps": "4", "train_batch_size": "20", "width": "4", "latent_dim": "8",
                   "checkpoint_every": "2"}
NUM_IMAGES, SHARD_SIZE = 160, 20  # 8 shards
TRAIN = ["--student", "lenet5_half", "--epochs", "2", "--batch-size-per-rank", "8", "--workers", "2", "--quiet",
         "--ema-decay", "0.9", "--mixup", "0.2", "--keep", "best-val"]
TRIALS = int(os.environ.get("DFKD_ELASTIC_TRIALS", "1"))
KILLS = int(os.environ.get("DFKD_ELASTIC_KILLS", "1"))
SEED = int(os.environ.get("DFKD_ELASTIC_SEED", "0"))


def torchrun(*args: str, cwd: Path = REPO, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_vars}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_teacher_path):
    """8 shards from one process: the reference for the 2-rank synthesis, the data for the 2-rank training."""
    out = tmp_path_factory.mktemp("dist") / "one"
    generate(GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path), out=str(out), num_images=NUM_IMAGES,
                            shard_size=SHARD_SIZE, write_batch_size=20, progress=False, method_options=TINY_GENERATORS))
    return out


# --------------------------------------------------------------------------- stage two: the data split
def test_ranks_read_disjoint_shards_each_epoch_and_other_shards_next_epoch(shards):
    manifest = read_manifest(shards)
    seen = {}
    for epoch in (0, 1):
        for rank in (0, 1):
            # 8 shards / (2 ranks x 2 workers): one epoch is exactly one pass over each reader's 2 shards
            loader = ShardLoader(shards, manifest, batch_size=10, workers=2, aug="none", seed=5, rank=rank,
                                 world_size=2, shuffle_buffer=1)
            indices = torch.cat([batch.index for batch in loader.epoch(epoch)])
            assert len(loader) == NUM_IMAGES // (10 * 2) and len(indices) == NUM_IMAGES // 2
            seen[epoch, rank] = set((indices // SHARD_SIZE).tolist())
    for epoch in (0, 1):
        assert not seen[epoch, 0] & seen[epoch, 1]                       # disjoint within an epoch
        assert seen[epoch, 0] | seen[epoch, 1] == set(range(8))          # and every shard is read
    assert seen[0, 0] != seen[1, 0] and seen[0, 1] != seen[1, 1]         # reshuffled across epochs


def test_too_few_shards_for_ranks_and_workers_is_a_clear_error(shards):
    from dfkd.common.errors import UserError

    manifest = read_manifest(shards)
    with pytest.raises(UserError, match=r"8 shards but 3 workers x 4 ranks need at least 12.*--workers 2"):
        ShardLoader(shards, manifest, batch_size=4, workers=3, rank=0, world_size=4)
    with pytest.raises(UserError, match="run at most 8 processes"):
        ShardLoader(shards, manifest, batch_size=1, workers=1, rank=0, world_size=16)


# --------------------------------------------------------------------------- stage two: DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, options: dict, stop_at_epoch: int | None, results) -> None:
    """One spawned rank: torchrun's environment, then train() (interrupted at `stop_at_epoch`)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import dfkd.distill.train as train_module

    if stop_at_epoch is not None:
        real = train_module.train_one_epoch

        def interrupted(*args, **kwargs):
            if args[5] == stop_at_epoch:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        train_module.train_one_epoch = interrupted
    try:
        results.put((rank, train_module.train(train_module.TrainConfig(**options))))
    except KeyboardInterrupt:
        results.put((rank, "interrupted"))


def spawn_two_ranks(options: dict, stop_at_epoch: int | None = None) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, options, stop_at_epoch, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return out


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    """An undisturbed 2-rank training on torchrun: (its folder, its output)."""
    out = tmp_path_factory.mktemp("dist") / "straight"
    proc = torchrun("-m", "dfkd.distill", "train", "--shards", str(shards), *TRAIN, "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_two_rank_training_on_torchrun_and_resume_after_interruption(shards, straight, tmp_path):
    reference, stdout = straight
    assert stdout.count("done: ") == 1  # rank 0 reports
    rows = (reference / "metrics.csv").read_text().splitlines()
    # the held-out split synth wrote beside the shards is found and measured (by rank 0); then the loss terms
    assert rows[0].endswith("ema_top1,val_agreement,val_kl,loss_kd") and len(rows) == 3
    assert all(row.split(",")[8] and row.split(",")[9] for row in rows[1:])
    assert rows[2].split(",")[1] == str(2 * NUM_IMAGES // (8 * 2))  # steps: the global batch is 2 x 8

    config = dict(shards=str(shards), student="lenet5_half", out=str(tmp_path / "resumed"), epochs=2,
                  batch_size_per_rank=8, workers=2, progress=False, ema_decay=0.9, mixup=0.2, keep="best-val")
    assert spawn_two_ranks(config, stop_at_epoch=1) == {0: "interrupted", 1: "interrupted"}
    assert len((tmp_path / "resumed" / "metrics.csv").read_text().splitlines()) == 2  # epoch 1 was saved
    results = spawn_two_ranks(config | {"resume": True})
    assert results[0]["epochs"] == results[1]["epochs"] == 2
    assert results[0]["train_loss"] == pytest.approx(results[1]["train_loss"])  # averaged over ranks
    assert same_run(tmp_path / "resumed", reference)  # bit-identical continuation
    # another number of processes cannot continue this run
    from dfkd.distill.train import TrainConfig, train

    with pytest.raises(UserError, match="run of 2 process"):
        train(TrainConfig(**config | {"resume": True}))


def test_every_rank_takes_rank_0s_stopping_decision_and_a_resume_makes_it_again(shards, tmp_path):
    """--stop-patience on 2 ranks: rank 0 alone measures the held-out split, the other rank takes its decision
    (min delta 1: it triggers after epoch 2, the cool-down of 1 epoch ends the run at 3 of at most 4; a rank
    that trained on would wait for its peer for ever). Interrupted in the cool-down and resumed, the run ends
    with the same student and logs as straight."""
    config = dict(shards=str(shards), student="lenet5_half", epochs=4, batch_size_per_rank=8, workers=2,
                  progress=False, stop_patience=1, stop_min_delta=1.0, stop_cooldown=0.5)
    straight = spawn_two_ranks(config | {"out": str(tmp_path / "straight")})
    assert [(straight[r]["stopped_epoch"], straight[r]["epochs"]) for r in (0, 1)] == [(3, 3), (3, 3)]
    resumed = config | {"out": str(tmp_path / "resumed")}
    assert spawn_two_ranks(resumed, stop_at_epoch=2) == {0: "interrupted", 1: "interrupted"}
    assert [r["stopped_epoch"] for r in spawn_two_ranks(resumed | {"resume": True}).values()] == [3, 3]
    got, want = (load_model_checkpoint(tmp_path / r / "student.pt")["state_dict"] for r in ("resumed", "straight"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(read_rows(tmp_path / "resumed" / f) == read_rows(tmp_path / "straight" / f)
               for f in ("metrics.csv", "steps.csv"))
    assert [row["phase"] for row in read_rows(tmp_path / "straight" / "metrics.csv")] == ["train"] * 2 + ["cool-down"]


def read_rows(path: Path, drop=("seconds", "images_per_s")) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def same_run(run: Path, reference: Path) -> bool:
    """The same students (final, EMA, best on the held-out split) bit for bit, the same logs."""
    for name in ("student.pt", "student_ema.pt", "student_best_val.pt"):
        got, want = (load_model_checkpoint(r / name)["state_dict"] for r in (run, reference))
        if got.keys() != want.keys() or not all(torch.equal(got[k], want[k]) for k in want):
            return False
    return all(read_rows(run / f) == read_rows(reference / f) for f in ("metrics.csv", "steps.csv"))


# --------------------------------------------------------------------------- elastic restarts (torchrun --max-restarts)
def start_torchrun(args: list[str], max_restarts: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.1", *args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def rank_pids(agent: int, attempt: int) -> dict[int, int]:
    """{rank: pid} of the worker processes that torchrun (pid `agent`, started here) runs in restart `attempt`:
    its own children only."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent:
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode().split("\0") if "=" in v)
            if env.get("TORCHELASTIC_RESTART_COUNT") == str(attempt) and "RANK" in env:
                found[int(env["RANK"])] = int(entry.name)
    return found


def kill_ranks_at_random_times(proc: subprocess.Popen, lock: Path, kills: int, rng: random.Random,
                               delay: tuple[float, float]) -> list[str]:
    """SIGKILL one rank (drawn) of the job `proc` runs, `kills` times, each `delay` (drawn) seconds after that
    attempt's rank 0 took the output folder's lock (so that it lands in the work). Returns what happened."""
    outcomes = []
    for attempt in range(kills):
        deadline, pids = time.monotonic() + 120, {}
        while proc.poll() is None and time.monotonic() < deadline:
            pids = rank_pids(proc.pid, attempt)
            with contextlib.suppress(OSError, IndexError):
                if len(pids) == 2 and lock.read_text().split()[0] == str(pids[0]):
                    break
            time.sleep(0.02)
        else:
            outcomes.append(f"attempt {attempt}: the job ended before its rank 0 took the lock")
            break
        wait, rank = rng.uniform(*delay), rng.randrange(2)
        time.sleep(wait)
        try:
            os.kill(pids[rank], signal.SIGKILL)
            outcomes.append(f"attempt {attempt}: killed rank {rank} {wait:.2f} s into the work")
        except ProcessLookupError:
            outcomes.append(f"attempt {attempt}: rank {rank} had ended within {wait:.2f} s")
            break
    return outcomes


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    return output


def shard_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and (p.suffix == ".tar" or p.name == "manifest.json")}


def test_distill_ranks_killed_under_torchrun_continue_without_resume(shards, straight, tmp_path):
    reference, _ = straight
    rng = random.Random(SEED + 1)
    for trial in range(TRIALS):
        run = tmp_path / f"killed-{trial}"
        proc = start_torchrun(["-m", "dfkd.distill", "train", "--shards", str(shards), *TRAIN, "--out", str(run)],
                              KILLS)
        outcomes = kill_ranks_at_random_times(proc, run / ".lock", KILLS, rng, (0.0, 2.0))
        output = finish(proc)
        print(f"distill train, trial {trial}:", outcomes)
        restarts = sum("killed" in o for o in outcomes)
        if restarts:
            assert f"torchrun restart {restarts} of {KILLS}: continuing the run in {run}" in output, output
        assert same_run(run, reference)


def test_a_restart_continues_only_its_own_job_and_only_with_the_same_settings(shards, tmp_path, monkeypatch, capfd):
    """The decision itself, in one process: torchrun's variables set by hand."""
    from dfkd.distill.train import TrainConfig, train

    def config(**kw) -> TrainConfig:
        return TrainConfig(**dict(shards=str(shards), student="lenet5_half", out=str(tmp_path / "run"), epochs=1,
                                  batch_size_per_rank=16, workers=0, progress=False) | kw)

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    train(config())                                           # the first start records its job
    assert (tmp_path / "run" / ".torchrun-job").read_text() == "job-a\n"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    train(config())                                           # its restart continues the run (here: already done)
    assert "torchrun restart 1 of 3: continuing the run in" in capfd.readouterr().err
    with pytest.raises(UserError, match="belongs to a run with other settings"):
        train(config(lr=0.5))                                 # ... as --resume does: not with other settings
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")        # another job's restart: not its run
    with pytest.raises(UserError, match="already holds a run: pass --resume"):
        train(config())
