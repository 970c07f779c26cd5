"""Stage one as a 2-process job on the CPU (gloo, torchrun): the ranks' shards equal one process's bytes even with
a rank SIGKILLed at random times under `--max-restarts`, and a full disk under 2 ranks. The helpers and the
reference shards are test_distributed.py's (stage two's 2-rank tests); a file of its own so that the two halves
run side by side. More kills: DFKD_ELASTIC_TRIALS / _KILLS / _SEED as in test_distributed.py, with -k killed."""
from __future__ import annotations

import random

from dfkd.common.shards import read_manifest, verify_dataset
from dfkd.synth.generate import GenerateConfig, generate

from test_distributed import (KILLS, NUM_IMAGES, SEED, SHARD_SIZE, TINY_GENERATORS, TRIALS, REPO,  # noqa: F401
                              finish, kill_ranks_at_random_times, shard_files, shards, start_torchrun, torchrun)


# --------------------------------------------------------------------------- stage one
def test_two_rank_synthesis_equals_one_process_even_with_ranks_killed(shards, tiny_teacher_path, tmp_path):
    """torchrun --max-restarts KILLS, one rank SIGKILLed KILLS times at random (TRIALS jobs): the restarted
    job keeps what was finished and ends with the bytes one undisturbed process writes."""
    sets = [a for k, v in TINY_GENERATORS.items() for a in ("--set", f"{k}={v}")]
    rng = random.Random(SEED)
    for trial in range(TRIALS):
        out = tmp_path / f"two-{trial}"
        proc = start_torchrun(["-m", "dfkd.synth", "generate", "--teacher", "lenet5", "--weights", str(tiny_teacher_path),
                               "--out", str(out), "--num-images", str(NUM_IMAGES), "--shard-size", str(SHARD_SIZE),
                               "--write-batch-size", "20", "--quiet", *sets], KILLS)
        outcomes = kill_ranks_at_random_times(proc, out / ".lock", KILLS, rng, (0.0, 3.0))
        output = finish(proc)
        print(f"synth generate, trial {trial}:", outcomes)
        # rank 0 reports, once per attempt that got to the end (a kill can land after its report, in the teardown)
        assert 1 <= output.count("wrote 160 images in 8 shards") <= 1 + sum("killed" in o for o in outcomes)
        # each rank wrote its own shards (and trained its own generators): 0, 2, ... and 1, 3, ...
        assert read_manifest(out).complete and shard_files(out) == shard_files(shards) and verify_dataset(out) == []
    out = tmp_path / "two-0"
    # resume per rank: a lost shard of rank 1 is rewritten, identical (here by a writer process of that
    # rank, on the explicit CPU device); the others are kept
    (out / "shard-000003.tar").unlink()
    kept = (out / "shard-000002.tar").stat().st_mtime_ns
    proc = torchrun("-m", "dfkd.synth", "generate", "--teacher", "lenet5", "--weights", str(tiny_teacher_path),
                    "--out", str(out), "--num-images", str(NUM_IMAGES), "--shard-size", str(SHARD_SIZE),
                    "--write-batch-size", "20", "--quiet", "--device", "cpu", "--write-workers", "1", *sets)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (proc.stdout + proc.stderr).count("wrote 160 images in 8 shards") == 1   # rank 0 alone reports
    assert (out / "shard-000003.tar").read_bytes() == (shards / "shard-000003.tar").read_bytes()
    assert (out / "shard-000002.tar").stat().st_mtime_ns == kept


# --------------------------------------------------------------------------- a full disk under 2 ranks
def test_synth_disk_full_under_two_ranks_names_the_file_and_the_rerun_is_identical(shards, tiny_teacher_path, tmp_path):
    """ENOSPC (injected: common/faults.py) while rank 1 writes a generator checkpoint, then its shard, then
    while rank 0 replaces the manifest: each time one line naming the file and the fix, from the rank that
    met it, and no traceback of ours; the rerun (here one process) ends byte-identical."""
    out = tmp_path / "full"
    sets = [f"--set={k}={v}" for k, v in TINY_GENERATORS.items()]
    command = ["-m", "dfkd.synth", "generate", "--teacher", "lenet5", "--weights", str(tiny_teacher_path), "--out",
               str(out), "--num-images", str(NUM_IMAGES), "--shard-size", str(SHARD_SIZE), "--write-batch-size", "20",
               "--quiet", "--write-workers", "0", *sets]
    for fault, name in (("enospc@commit:generator-001.pt:1", "state/generator-001.pt"),  # generator 1: rank 1's
                        ("enospc@commit:shard-000001.tar:1", "shard-000001.tar"),        # shard 1: rank 1's
                        ("enospc@commit:manifest.json:1", "manifest.json")):             # the manifest: rank 0's
        proc = torchrun(*command, DFKD_FAULT=fault)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0
        errors = [line for line in output.splitlines() if line.startswith("Error: ")]
        assert errors[0] == (f"Error: cannot write {out / name}: no space left on the device (nothing was left under "
                             "that name); make room (free space, or raise the quota or limit) and rerun the same `synth "
                             "generate`: finished shards are kept"), output
        # the other rank, if it met the end of the first in a collective before torchrun stopped it: one line too
        assert all(" stopped: another process of this job ended first" in line for line in errors[1:]), output
        # no traceback through our code, on either rank (torchrun's own agent prints one of its own)
        assert not [d for d in ("common", "synth", "distill") if f'File "{REPO / d}' in output], output
        assert not [p for p in out.rglob(".*.tmp*")]
        assert all(p.read_bytes() == (shards / p.name).read_bytes() for p in out.glob("shard-*.tar"))
    generate(GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path), out=str(out), num_images=NUM_IMAGES,
                            shard_size=SHARD_SIZE, write_batch_size=20, progress=False, method_options=TINY_GENERATORS))
    assert shard_files(out) == shard_files(shards) and verify_dataset(out) == []


# --------------------------------------------------------------------------- write-time selection under 2 ranks
def test_two_rank_selection_equals_one_process(tiny_teacher_path, tmp_path):
    """--select under torchrun: each rank chooses within its own shards and notes what it did; the union, and rank
    0's manifest with its selection record (training and held-out split), are what one process writes."""
    one = tmp_path / "one"
    generate(GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path), out=str(one), num_images=80,
                            shard_size=SHARD_SIZE, write_batch_size=20, progress=False, select="boundary",
                            val_images=30, method_options=TINY_GENERATORS))
    out = tmp_path / "two"
    sets = [a for k, v in TINY_GENERATORS.items() for a in ("--set", f"{k}={v}")]
    proc = torchrun("-m", "dfkd.synth", "generate", "--teacher", "lenet5", "--weights", str(tiny_teacher_path),
                    "--out", str(out), "--num-images", "80", "--shard-size", str(SHARD_SIZE), "--write-batch-size",
                    "20", "--select", "boundary", "--val-images", "30", "--quiet", *sets)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "selected 80 of 160 candidates (boundary)" in proc.stdout
    assert read_manifest(out).selection["shards"].keys() == {f"shard-00000{i}.tar" for i in range(4)}
    assert shard_files(out) == shard_files(one) and verify_dataset(out) == []
