"""Fault injection: kill `synth generate` and `distill train` at exact points (DFKD_FAULT, common/faults.py)
and at random times, fill the disk, make the loss NaN; then rerun and compare with an uninterrupted run.

Exact kill points run the library function in a forked child (fast: no interpreter start-up); the
random-time kills run the real command lines in subprocesses.
"""
from __future__ import annotations

import contextlib
import csv
import os
import random
import resource
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch

from dfkd.common.errors import UserError
from dfkd.common.faults import FAULT_ENV
from dfkd.common.fileio import folder_lock, is_temp_file
from dfkd.common.models import load_model_checkpoint
from dfkd.common.shards import read_manifest, verify_dataset
from dfkd.distill.losses import LOSSES
from dfkd.distill.train import TrainConfig, train
from dfkd.synth.generate import GenerateConfig, generate

# random-time kills per command line (each costs an interpreter start); more for a longer chaos run:
# DFKD_RANDOM_KILLS=10 DFKD_RANDOM_SEED=3 python -m pytest tests/test_faults.py -k random_times
RANDOM_KILLS = int(os.environ.get("DFKD_RANDOM_KILLS", "1"))
RANDOM_SEED = int(os.environ.get("DFKD_RANDOM_SEED", "0"))
TINY = {"num_generators": "2", "steps": "6", "train_batch_size": "20", "width": "4", "latent_dim": "8",
        "feature_diversity_weight": "0.5", "sample_noise_scale": "1.5", "checkpoint_every": "2"}
KILLED = -signal.SIGKILL


# --------------------------------------------------------------------------- helpers
def run_forked(target: Callable[[], object], fault: str | None = None,
               file_size_limit: int | None = None) -> tuple[int, str]:
    """Run `target` in a forked child (optionally with DFKD_FAULT set, or a file-size limit so that larger
    writes fail with EFBIG). Returns (exit code, negative for a signal; the child's error message)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code, message = 0, ""
        try:
            os.close(read_end)
            if fault:
                os.environ[FAULT_ENV] = fault
            if file_size_limit:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
            target()
        except BaseException as e:  # noqa: BLE001 (reported to the parent)
            code, message = 1, f"{type(e).__name__}: {e}"
        os.write(write_end, message.encode())
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), message


def file_bytes(folder: Path, pattern: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if is_temp_file(p)]


def synth_config(teacher: Path, out: Path) -> GenerateConfig:
    return GenerateConfig(teacher="lenet5", weights=str(teacher), out=str(out), method_options=dict(TINY),
                          num_images=50, shard_size=20, write_batch_size=16, progress=False)


def train_config(shards: Path, out: Path, **overrides) -> TrainConfig:
    options = dict(shards=str(shards), student="lenet5_half", out=str(out), epochs=3, batch_size_per_rank=10, workers=0,
                   progress=False)
    return TrainConfig(**(options | overrides))


def read_rows(path: Path, drop=("seconds", "images_per_s")) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def assert_same_student(run: Path, reference: Path) -> None:
    got = load_model_checkpoint(run / "student.pt")["state_dict"]
    want = load_model_checkpoint(reference / "student.pt")["state_dict"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert read_rows(run / "metrics.csv") == read_rows(reference / "metrics.csv")
    assert read_rows(run / "steps.csv") == read_rows(reference / "steps.csv")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher_path):
    """An uninterrupted synthesis and an uninterrupted 3-epoch distillation from it."""
    root = tmp_path_factory.mktemp("reference")
    generate(synth_config(tiny_teacher_path, root / "shards"))
    train(train_config(root / "shards", root / "run"))
    return {"teacher": tiny_teacher_path, "shards": root / "shards", "run": root / "run",
            "shard_bytes": file_bytes(root / "shards", "shard-*.tar"),
            "manifest": (root / "shards" / "manifest.json").read_bytes()}


def assert_same_dataset(out: Path, reference: dict) -> None:
    assert file_bytes(out, "shard-*.tar") == reference["shard_bytes"]
    assert (out / "manifest.json").read_bytes() == reference["manifest"]
    assert temp_files(out) == [] and verify_dataset(out) == []


# --------------------------------------------------------------------------- synth: exact kill points
SYNTH_KILL_POINTS = {
    "generator-step:3": "training generator 1, one step after its step-2 checkpoint",
    "generator-step:8": "training generator 2, before its first checkpoint",
    "half-written:generator-000.pt:2": "half-way through writing a generator checkpoint",
    "commit:generator-001.pt:1": "generator checkpoint complete in its temp file, not yet renamed",
    "shard-sample:5": "writing the first shard",
    "shard-sample:27": "writing the second shard",
    "commit:shard-000001.tar:1": "second shard complete in its temp file, not yet renamed",
    "shard-done:1": "first shard renamed, not yet in the manifest",
    "shard-listed:2": "between the second and third shard",
    "commit:manifest.json:3": "replacing the manifest after the second shard",
    "commit:_info.json:1": "manifest marked complete, _info.json not yet written",
}


@pytest.mark.parametrize("fault", SYNTH_KILL_POINTS)
def test_synth_killed_at_a_point_resumes_to_identical_bytes(reference, tmp_path, fault):
    out = tmp_path / "shards"
    code, message = run_forked(lambda: generate(synth_config(reference["teacher"], out)), fault=fault)
    assert code == KILLED, f"the fault point {fault} was never reached: {message}"
    # nothing half-written under a final name: every shard there is complete, the manifest readable
    for name, data in file_bytes(out, "shard-*.tar").items():
        assert data == reference["shard_bytes"][name]
    read_manifest(out, require_complete=False)
    generate(synth_config(reference["teacher"], out))  # the same command again
    assert_same_dataset(out, reference)


def test_synth_killed_twice_then_finished(reference, tmp_path):
    out = tmp_path / "shards"
    for fault in ("generator-step:5", "shard-sample:30"):
        assert run_forked(lambda: generate(synth_config(reference["teacher"], out)), fault=fault)[0] == KILLED
    generate(synth_config(reference["teacher"], out))
    assert_same_dataset(out, reference)


# --------------------------------------------------------------------------- distill: exact kill points
DISTILL_KILL_POINTS = {
    "train-step:3": ("mid-epoch 1, no checkpoint yet", None),
    "train-step:12": ("mid-epoch 3", 2),
    "half-written:checkpoint.pt:2": ("half-way through writing the epoch-2 checkpoint", 1),
    "commit:checkpoint.pt:2": ("epoch-2 checkpoint complete in its temp file, not yet renamed", 1),
    "epoch-saved:1": ("epoch-1 checkpoint saved, metrics.csv not yet written", 1),
    "commit:student.pt:1": ("all epochs done, final student not yet renamed", 3),
}


@pytest.mark.parametrize("fault", DISTILL_KILL_POINTS)
def test_distill_killed_at_a_point_resumes_from_the_last_complete_checkpoint(reference, tmp_path, fault):
    run = tmp_path / "run"
    code, message = run_forked(lambda: train(train_config(reference["shards"], run)), fault=fault)
    assert code == KILLED, f"the fault point {fault} was never reached: {message}"
    saved_epoch = DISTILL_KILL_POINTS[fault][1]
    if saved_epoch is None:
        assert not (run / "checkpoint.pt").exists()
    else:  # the checkpoint under the final name is complete and the last finished epoch's
        assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == saved_epoch
    train(train_config(reference["shards"], run, resume=True))  # the same command with --resume
    assert_same_student(run, reference["run"])
    assert temp_files(run) == []


# --------------------------------------------------------------------------- random-time kills of the CLIs
def wait_for_lock(lock: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until `proc` holds its output folder's lock (its pid in `lock`): the interpreter has started and
    the command begins its work. False if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if lock.read_text().split()[:1] == [str(proc.pid)]:
                return True
        except OSError:
            pass
        time.sleep(0.01)
    return False


def kill_at_random_times(command: list[str], lock: Path, delays: list[float], env: dict,
                         progress: Callable[[], str]) -> list[str]:
    """Start `command` once per delay and SIGKILL it that many seconds after it took the folder's lock
    (so the kill lands in the work, not in the interpreter's start-up). Returns what happened, with
    `progress()` (what is on disk) after each kill."""
    outcomes = []
    for delay in delays:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if not wait_for_lock(lock, proc):
                raise subprocess.TimeoutExpired(command, 0) if proc.poll() is None else ChildProcessError
            proc.wait(timeout=delay)
            outcomes.append(f"finished within {delay:.2f}s (exit {proc.returncode})")
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            outcomes.append(f"killed {delay:.2f}s into the work: {progress()}")
        except ChildProcessError:
            outcomes.append(f"ended before taking the lock (exit {proc.returncode})")
        assert proc.returncode in (0, KILLED), proc.stderr.read().decode()
        proc.stderr.close()
    return outcomes


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_synth_cli_killed_at_random_times(reference, tmp_path):
    out = tmp_path / "shards"
    command = [sys.executable, "-m", "dfkd.synth", "generate", "--teacher", "lenet5", "--weights",
               str(reference["teacher"]), "--out", str(out), "--num-images", "50", "--shard-size", "20",
               "--write-batch-size", "16", "--quiet", "--threads", "1"] + [f"--set={k}={v}" for k, v in TINY.items()]
    rng = random.Random(RANDOM_SEED)
    delays = [rng.uniform(0.5, 6.0) for _ in range(RANDOM_KILLS)]  # the work takes about 6 s in a fresh process
    def progress() -> str:
        return (f"{len(list(out.glob('state/generator-*.pt')))} generator checkpoints, "
                f"{len(list(out.glob('shard-*.tar')))} shards, {len(temp_files(out))} temp files")

    print(kill_at_random_times(command, out / ".lock", delays, cli_env(), progress))
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_dataset(out, reference)


def test_distill_cli_killed_at_random_times(reference, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "dfkd.distill", "train", "--shards", str(reference["shards"]), "--student",
               "lenet5_half", "--out", str(run), "--epochs", "3", "--batch-size-per-rank", "10", "--workers", "0",
               "--quiet", "--threads", "1", "--resume"]
    rng = random.Random(RANDOM_SEED + 1)
    delays = [rng.uniform(0.5, 5.5) for _ in range(RANDOM_KILLS)]  # about 5 s in a fresh process
    def progress() -> str:
        if not (run / "checkpoint.pt").exists():
            return "no checkpoint yet"
        return f"checkpoint of epoch {torch.load(run / 'checkpoint.pt', weights_only=True)['epoch']}"

    print(kill_at_random_times(command, run / ".lock", delays, cli_env(), progress))
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert_same_student(run, reference["run"])


def test_a_killed_run_frees_its_folder_even_while_its_workers_live(tmp_path):
    """The folder lock dies with the process that took it, not with the DataLoader workers it forked
    (they linger a few seconds after their parent is killed): an immediate rerun is not refused."""
    read_end, write_end = os.pipe()
    holder = os.fork()
    if holder == 0:
        with folder_lock(tmp_path, "distill train"):
            worker = os.fork()
            if worker == 0:
                time.sleep(20)
                os._exit(0)
            os.write(write_end, str(worker).encode())
            time.sleep(60)
        os._exit(0)
    worker = int(os.read(read_end, 32))
    try:
        with pytest.raises(UserError, match="being written by another running"):
            with folder_lock(tmp_path, "distill train"):
                pass
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        os.kill(worker, 0)  # the worker still runs ...
        with folder_lock(tmp_path, "distill train"):  # ... and the folder is free
            pass
    finally:
        for pid in (holder, worker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- disk full
def test_synth_disk_full_at_a_shard_then_resumed(reference, tmp_path):
    out = tmp_path / "shards"
    # train the generators (killed at the first shard sample), then run out of room writing that shard
    assert run_forked(lambda: generate(synth_config(reference["teacher"], out)), fault="shard-sample:1")[0] == KILLED
    code, message = run_forked(lambda: generate(synth_config(reference["teacher"], out)), file_size_limit=60_000)
    assert code == 1 and message.startswith("DiskFullError: cannot write ")
    assert "shard-000000.tar: file larger than the file-size limit" in message
    assert "rerun the same `synth generate`" in message and "\n" not in message
    assert not list(out.glob("shard-*")) and temp_files(out) == []
    generate(synth_config(reference["teacher"], out))
    assert_same_dataset(out, reference)


def test_synth_disk_full_at_a_generator_checkpoint(reference, tmp_path):
    out = tmp_path / "shards"
    code, message = run_forked(lambda: generate(synth_config(reference["teacher"], out)), file_size_limit=60_000)
    assert code == 1 and "state/generator-000.pt: file larger than the file-size limit" in message
    assert not (out / "state" / "generator-000.pt").exists() and temp_files(out) == []
    generate(synth_config(reference["teacher"], out))
    assert_same_dataset(out, reference)


def test_distill_disk_full_at_a_checkpoint_then_resumed(reference, tmp_path):
    run = tmp_path / "run"
    code, message = run_forked(lambda: train(train_config(reference["shards"], run)), file_size_limit=100_000)
    assert code == 1 and "checkpoint.pt: file larger than the file-size limit" in message
    assert "rerun with --resume" in message
    assert not (run / "checkpoint.pt").exists() and temp_files(run) == []
    train(train_config(reference["shards"], run, resume=True))
    assert_same_student(run, reference["run"])


def test_distill_enospc_at_a_checkpoint_or_the_metrics_then_resumed(reference, tmp_path):
    """A full disk (ENOSPC, injected at the write: `enospc@<point>:<n>`) while the epoch-2 checkpoint, or
    the epoch-2 metrics.csv after its checkpoint, is written: one line naming the file and the fix; the
    files finished before are intact; --resume ends bit-identical."""
    for fault, name, saved in (("enospc@commit:checkpoint.pt:2", "checkpoint.pt", 1),
                               ("enospc@commit:metrics.csv:2", "metrics.csv", 2)):
        run = tmp_path / name
        code, message = run_forked(lambda: train(train_config(reference["shards"], run)), fault=fault)
        assert code == 1 and "\n" not in message, message
        assert message == (f"DiskFullError: cannot write {run / name}: no space left on the device (nothing was left "
                           "under that name); make room (free space, or raise the quota or limit) and rerun with "
                           "--resume: the run continues from its last checkpoint"), message
        assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == saved and temp_files(run) == []
        assert len(read_rows(run / "metrics.csv")) == 1  # the epoch-1 row, complete
        train(train_config(reference["shards"], run, resume=True))
        assert_same_student(run, reference["run"])


def test_export_enospc_names_the_file_and_keeps_what_was_written(reference, tmp_path):
    from dfkd.distill.export import export_run

    out = tmp_path / "export"
    code, message = run_forked(lambda: export_run(reference["run"], out, ("torchscript", "export")),
                               fault="enospc@commit:student.pt2:1")
    assert code == 1 and "\n" not in message, message
    assert message.startswith(f"DiskFullError: cannot write {out / 'student.pt2'}: no space left on the device")
    assert message.endswith("rerun the same `distill export`: the files written before it are complete"), message
    assert sorted(p.name for p in out.iterdir()) == ["student.torchscript.pt"]  # complete; no temp file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        torch.jit.load(str(out / "student.torchscript.pt"))
    export_run(reference["run"], out, ("torchscript", "export"))
    assert sorted(p.name for p in out.iterdir()) == ["student.json", "student.pt2", "student.torchscript.pt"]


def test_a_second_writer_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(reference, tmp_path):
    import socket

    shards, run = tmp_path / "shards", tmp_path / "run"
    for folder in (shards, run):
        folder.mkdir()
        (folder / ".lock").write_text("4242 node-that-died\n")  # left by a killed run: no process holds the lock
    read_end, write_end = os.pipe()
    holder = os.fork()
    if holder == 0:  # takes both folders over, then holds them
        with folder_lock(shards, "synth generate"), folder_lock(run, "distill train"):
            os.write(write_end, b"1")
            time.sleep(60)
        os._exit(0)
    try:
        os.read(read_end, 1)
        host = socket.gethostname()
        assert (shards / ".lock").read_text() == (run / ".lock").read_text() == f"{holder} {host}\n"
        with pytest.raises(UserError) as error:
            generate(synth_config(reference["teacher"], shards))
        assert error.value.message == (f"{shards} is being written by another running `synth generate` (pid {holder} "
                                       f"on host {host}): wait for it to end or stop it, or choose another output "
                                       "folder")
        with pytest.raises(UserError, match=rf"{run} is being written by another running `distill train` \(pid "
                                            rf"{holder} on host {host}\)"):
            train(train_config(reference["shards"], run))
        assert [p.name for p in shards.iterdir()] == [p.name for p in run.iterdir()] == [".lock"]  # nothing written
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 250 kB tmpfs (needs root and mount rights; skipped elsewhere). Yields (folder, resize function)."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=250k", "tmpfs", str(folder)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the file-size-limit tests cover disk full")

    def resize(kilobytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kilobytes}k", str(folder)], check=True)

    yield folder, resize
    subprocess.run(["umount", str(folder)], check=False)


def test_distill_real_enospc_keeps_the_last_good_checkpoint(reference, small_tmpfs):
    folder, resize = small_tmpfs
    run = folder / "run"
    # 250 kB hold the epoch-1 checkpoint (145 kB) but not the temp file of the epoch-2 one beside it
    with pytest.raises(UserError, match="checkpoint.pt: no space left on the device .*rerun with --resume"):
        train(train_config(reference["shards"], run, epochs=3))
    assert temp_files(run) == []
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resize(4096)  # room freed
    train(train_config(reference["shards"], run, resume=True))
    assert_same_student(run, reference["run"])


# --------------------------------------------------------------------------- numerical faults
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(reference, tmp_path, monkeypatch):
    real_loss, calls = LOSSES["kd"], []

    class NanInEpochTwo(real_loss):
        def __call__(self, logits):
            calls.append(1)
            terms = super().__call__(logits)
            return terms | {"loss": terms["loss"] * float("nan")} if len(calls) == 7 else terms  # step 2 of epoch 2

    monkeypatch.setitem(LOSSES, "kd", NanInEpochTwo)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=r"stopped in epoch 2: the loss is nan at step 2 .*checkpoint.pt still "
                                        r"holds epoch 1, the last good one.*--detect-anomaly"):
        train(train_config(reference["shards"], run))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["student"].values())
    monkeypatch.setitem(LOSSES, "kd", real_loss)
    train(train_config(reference["shards"], run, resume=True))  # once the cause is gone, it continues
    assert_same_student(run, reference["run"])


def test_huge_learning_rate_diverges_with_a_clear_message(reference, tmp_path):
    with pytest.raises(UserError, match=r"stopped in epoch 1: .*(nan|inf).*no checkpoint was written"):
        train(train_config(reference["shards"], tmp_path / "run", lr=1e12, epochs=1))


def test_generator_nan_stops_synthesis(reference, tmp_path, monkeypatch):
    import dfkd.synth.methods.generator as generator_module

    monkeypatch.setattr(generator_module, "mode_seeking_loss", lambda x, z: torch.tensor(float("inf")))
    with pytest.raises(UserError, match=r"generator 1 diverged at step 1 \(loss is inf\); no checkpoint"):
        generate(synth_config(reference["teacher"], tmp_path / "shards"))


def test_detect_anomaly_runs_and_changes_nothing(reference, tmp_path):
    train(train_config(reference["shards"], tmp_path / "run", detect_anomaly=True))
    assert_same_student(tmp_path / "run", reference["run"])  # a diagnostic only: same numbers
