"""Both stages as 2-process jobs on the CPU (gloo): torchrun on the command line, plus spawned ranks
for what needs a monkeypatch (an interruption); the rank split of the shards."""
from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfkd.common.models import load_model_checkpoint
from dfkd.common.shards import read_manifest
from dfkd.distill.data import ShardLoader
from dfkd.synth.generate import GenerateConfig, generate

REPO = Path(__file__).resolve().parents[1]
TINY_GENERATORS = {"num_generators": "3", "steps": "4", "train_batch_size": "20", "width": "4", "latent_dim": "8"}
NUM_IMAGES, SHARD_SIZE = 160, 20  # 8 shards


def torchrun(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_teacher_path):
    """8 shards from one process: the reference for the 2-rank synthesis, the data for the 2-rank training."""
    out = tmp_path_factory.mktemp("dist") / "one"
    generate(GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path), out=str(out), num_images=NUM_IMAGES,
                            shard_size=SHARD_SIZE, write_batch_size=20, progress=False, method_options=TINY_GENERATORS))
    return out


# --------------------------------------------------------------------------- stage one
def test_two_rank_synthesis_equals_one_process(shards, tiny_teacher_path, tmp_path):
    out = tmp_path / "two"
    sets = [a for k, v in TINY_GENERATORS.items() for a in ("--set", f"{k}={v}")]
    proc = torchrun("-m", "dfkd.synth", "generate", "--teacher", "lenet5", "--weights", str(tiny_teacher_path),
                    "--out", str(out), "--num-images", str(NUM_IMAGES), "--shard-size", str(SHARD_SIZE),
                    "--write-batch-size", "20", "--quiet", *sets)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("wrote 160 images in 8 shards") == 1  # rank 0 reports, once
    # each rank wrote its own shards (and trained its own generators): 0, 2, ... and 1, 3, ...
    one, two = read_manifest(shards), read_manifest(out)
    assert two.complete and two.shards == one.shards  # names, sample counts, sha256: the same bytes
    assert sorted(p.name for p in out.glob("shard-*.tar")) == sorted(p.name for p in shards.glob("shard-*.tar"))
    # resume per rank: a lost shard of rank 1 is rewritten, identical (here by a writer process of that
    # rank, on the explicit CPU device); the others are kept
    (out / "shard-000003.tar").unlink()
    kept = (out / "shard-000002.tar").stat().st_mtime_ns
    proc = torchrun("-m", "dfkd.synth", "generate", "--teacher", "lenet5", "--weights", str(tiny_teacher_path),
                    "--out", str(out), "--num-images", str(NUM_IMAGES), "--shard-size", str(SHARD_SIZE),
                    "--write-batch-size", "20", "--quiet", "--device", "cpu", "--write-workers", "1", *sets)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "shard-000003.tar").read_bytes() == (shards / "shard-000003.tar").read_bytes()
    assert (out / "shard-000002.tar").stat().st_mtime_ns == kept


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


def test_two_rank_training_on_torchrun_and_resume_after_interruption(shards, tmp_path):
    options = ["--shards", str(shards), "--student", "lenet5_half", "--epochs", "2", "--batch-size-per-rank", "8",
               "--workers", "2", "--quiet", "--ema-decay", "0.9", "--keep", "best-val"]
    proc = torchrun("-m", "dfkd.distill", "train", *options, "--out", str(tmp_path / "straight"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("done: ") == 1  # rank 0 reports
    rows = (tmp_path / "straight" / "metrics.csv").read_text().splitlines()
    # the held-out split synth wrote beside the shards is found and measured (by rank 0); then the loss terms
    assert rows[0].endswith("ema_top1,val_agreement,val_kl,loss_kd") and len(rows) == 3
    assert all(row.split(",")[8] and row.split(",")[9] for row in rows[1:])
    assert rows[2].split(",")[1] == str(2 * NUM_IMAGES // (8 * 2))  # steps: the global batch is 2 x 8

    config = dict(shards=str(shards), student="lenet5_half", out=str(tmp_path / "resumed"), epochs=2,
                  batch_size_per_rank=8, workers=2, progress=False, ema_decay=0.9, keep="best-val")
    assert spawn_two_ranks(config, stop_at_epoch=1) == {0: "interrupted", 1: "interrupted"}
    assert len((tmp_path / "resumed" / "metrics.csv").read_text().splitlines()) == 2  # epoch 1 was saved
    results = spawn_two_ranks(config | {"resume": True})
    assert results[0]["epochs"] == results[1]["epochs"] == 2
    assert results[0]["train_loss"] == pytest.approx(results[1]["train_loss"])  # averaged over ranks
    for name in ("student.pt", "student_ema.pt", "student_best_val.pt"):
        straight = load_model_checkpoint(tmp_path / "straight" / name)["state_dict"]
        resumed = load_model_checkpoint(tmp_path / "resumed" / name)["state_dict"]
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), name  # bit-identical continuation
    # another number of processes cannot continue this run
    from dfkd.common.errors import UserError
    from dfkd.distill.train import TrainConfig, train

    with pytest.raises(UserError, match="run of 2 process"):
        train(TrainConfig(**config | {"resume": True, "epochs": 2}))
