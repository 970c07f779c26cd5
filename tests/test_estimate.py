"""`synth generate --estimate` (projected hours, images/s, disk bytes; no shards), the projection a plain run
prints from its first steps, and the warning for a CPU run with an ImageNet-size teacher."""
import json

import pytest
import torch
from click.testing import CliRunner

import dfkd.synth.estimate as timing
from dfkd.common.shards import read_manifest, verify_dataset
from dfkd.synth.cli import main as synth_cli
from dfkd.synth.estimate import Clock, Estimate
from dfkd.synth.generate import GenerateConfig, generate

TINY = {"num_generators": "2", "steps": "8", "train_batch_size": "16", "width": "4", "latent_dim": "8",
        "checkpoint_every": "3"}


def _config(teacher, out, **kw):
    base = dict(teacher="lenet5", weights=str(teacher), out=str(out), method_options=dict(TINY), num_images=120,
                shard_size=40, write_batch_size=20, progress=False, device="cpu", write_workers=0)
    base.update(kw)
    return GenerateConfig(**base)


def test_estimate_writes_no_shards_and_a_positive_projection(tiny_teacher_path, tmp_path):
    out = tmp_path / "out"
    est = generate(_config(tiny_teacher_path, out, estimate=True))
    assert isinstance(est, Estimate)
    assert sorted(p.name for p in out.iterdir()) == ["estimate.json"]   # no shards, manifest or state
    saved = json.loads((out / "estimate.json").read_text())
    # the run writes --num-images and the held-out split (by default a tenth of 120 images here): both are projected
    assert (saved["num_images"], saved["val_images"]) == (120 + 12, 12)
    assert saved["training_steps"] == 8 and saved["method"] == "generator"
    assert 0 < est.step_s and 0 < est.synthesis_s and 0 < est.writing_s
    assert est.total_s == pytest.approx(est.synthesis_s + est.writing_s)
    assert est.images_per_s == pytest.approx(132 / est.total_s)
    assert est.timed_batches >= 1 and est.batch_device_s > 0 and est.batch_encode_s > 0
    # disk: the tar members of 120 images (PNG, label, logits, meta: each a 512-byte header + padded data)
    assert 132 * 1000 < est.disk_bytes < 132 * 10_000
    # the folder stays usable for the run itself, and the estimate is of the same order as that run's bytes
    manifest = generate(_config(tiny_teacher_path, out))
    assert manifest.complete and verify_dataset(out) == []
    written = sum(s.size for s in read_manifest(out).shards)
    assert 0.5 < est.disk_bytes / written < 1.5


def test_estimate_cli_prints_the_projection(tiny_teacher_path, tmp_path):
    out = tmp_path / "est"
    result = CliRunner().invoke(synth_cli, ["generate", "--teacher", "lenet5", "--weights", str(tiny_teacher_path),
                                            "--num-images", "60", "--shard-size", "30", "--write-batch-size", "20",
                                            "--device", "cpu", "--write-workers", "1", "--method", "noise",
                                            "--out", str(out), "--estimate", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "estimate for 66 images (6 of them held out) (noise on cpu" in result.output
    assert "no training stage" in result.output
    assert "images/s" in result.output and "on disk" in result.output and "(no shards)" in result.output
    assert json.loads((out / "estimate.json").read_text())["write_workers"] == 1
    assert not list(out.glob("shard-*"))


def test_clock_counts_warm_up_steps_as_measured_and_the_rest_at_the_warm_rate():
    clock = Clock(torch.device("cpu"), total=100)
    clock.times = [0.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]   # two slow warm-up steps (3 s, 1 s), then 1 s each
    assert clock.warmup == 2 and clock.timed == 4 and clock.per_step == pytest.approx(1.0)
    assert clock.project(100) == pytest.approx(4.0 + 98 * 1.0)
    assert not clock.enough   # 4 s timed: less than ENOUGH_S
    clock.times.append(9.0)
    assert clock.enough
    long = Clock(torch.device("cpu"), total=10)
    long.times = [0.0, 60.0, 100.0]   # a first step over LONG_STEP_S is the only warm-up one
    assert long.warmup == 1 and long.per_step == pytest.approx(40.0) and long.enough
    assert long.project(10) == pytest.approx(60.0 + 9 * 40.0)


def test_writing_projection_overlaps_device_and_writers_only_with_writers():
    clock = Clock(torch.device("cpu"), total=1000)
    clock.times = [0.0, 2.0, 3.0, 4.0]   # warm-up 2 batches (2 s, 1 s)

    class M:
        name = "noise"

        def training_steps(self):
            return 0
    kw = dict(device=torch.device("cpu"), method=M(), num_images=10_000, write_batch_size=100, startup_s=1.0,
              train=None, batch_device_s=1.0, batch_encode_s=0.5, write_clock=clock, nbytes=300_000, images=300,
              measured_s=5.0)
    pooled, alone = timing.project(workers=2, **kw), timing.project(workers=0, **kw)
    assert pooled.writing_s == pytest.approx(3.0 + 9800 * 1.0 / 100)
    assert alone.writing_s == pytest.approx(3.0 + 9800 * 1.5 / 100)
    assert pooled.total_s == pytest.approx(1.0 + pooled.writing_s) and pooled.disk_bytes == 10_000_000
    # shards of 50 images with --write-batch-size 100: every batch ends with its shard, so holds 50 images
    small = timing.project(workers=2, **(kw | {"images": 150}))
    assert small.writing_s == pytest.approx(3.0 + 9900 * 1.0 / 50)


def test_a_plain_run_prints_its_projection_from_its_first_steps(tiny_teacher_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(timing, "ENOUGH_S", 0.0)
    monkeypatch.setattr(timing, "ENOUGH_STEPS", 1)
    generate(_config(tiny_teacher_path, tmp_path / "out"))
    err = capsys.readouterr().err
    assert "projection: training 8 steps at" in err
    # the held-out split (a tenth of 120 images) is written after the training shards: part of what is left
    assert "projection: 80 images left to write at" not in err and "projection: 92 images left to write at" in err
    assert "on disk" in err


def test_cpu_with_an_imagenet_size_teacher_warns_at_start(tmp_path):
    args = ["generate", "--teacher", "resnet18", "--weights", "none", "--resolution", "128", "--method", "noise",
            "--num-images", "2", "--shard-size", "2", "--write-batch-size", "2", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(synth_cli, args + ["--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "warning: synthesising on the CPU for a 128 px teacher (resnet18)" in result.output
    assert "--device cuda" in result.output and "--estimate" in result.output and "--set steps=N" in result.output
    small = CliRunner().invoke(synth_cli, ["generate", "--teacher", "resnet18", "--weights", "none", "--resolution",
                                           "32", *args[7:], "--out", str(tmp_path / "b")])
    assert small.exit_code == 0, small.output
    assert "warning: synthesising on the CPU" not in small.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_estimate_with_bf16_channels_last_and_writers(tiny_teacher_path, tmp_path):
    out = tmp_path / "cuda"
    est = generate(_config(tiny_teacher_path, out, estimate=True, device="cuda", amp="bf16", channels_last=True,
                           write_workers=2))
    assert est.device.startswith("cuda") and est.total_s > 0 and est.disk_bytes > 0
    assert sorted(p.name for p in out.iterdir()) == ["estimate.json"]
