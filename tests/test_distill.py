"""Stage two on tiny data: 2 shards x 32 random 28 px images labelled by a random LeNet-5 teacher."""
from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dfkd.common.errors import UserError
from dfkd.common.models import create_model, load_model_checkpoint, save_model_checkpoint, teacher_record
from dfkd.common.shards import Sample, build_manifest, read_manifest, read_shard, write_manifest, write_shard
from dfkd.distill.cli import main
from dfkd.distill.augment import random_crop_flip, random_translate
from dfkd.distill.data import Augmentation, Batch, EpochShardList, ShardLoader
from dfkd.distill.engine import warmup_cosine
from dfkd.distill.throughput import batch_to
from dfkd.distill.teacher import TeacherConfig, train_teacher
from dfkd.distill.losses.kd import kd_loss
from dfkd.distill.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
MNIST_CACHED = (REPO / "data" / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
SHARDS, PER_SHARD = 2, 32


# --------------------------------------------------------------------------- fixtures
def make_teacher(path: Path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    teacher = create_model("lenet5").eval()
    save_model_checkpoint(path, teacher)
    return teacher


def write_shard_folder(folder: Path, teacher: torch.nn.Module, weights: Path | str, shards: int = SHARDS,
                       seed: int = 0, method: str = "test") -> Path:
    """A complete synth-like folder: `shards` shards of PER_SHARD random images (drawn with `seed`) + the
    teacher's logits."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    spec = teacher.input_spec
    records = []
    for s in range(shards):
        images = rng.integers(0, 256, (PER_SHARD, spec.size, spec.size, spec.channels), dtype=np.uint8)
        with torch.no_grad():
            pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
            logits = teacher(spec.normalize(pixels)).numpy().astype(np.float16)
        samples = [Sample(f"sample-{s * PER_SHARD + i:08d}", images[i], int(logits[i].argmax()), logits[i])
                   for i in range(PER_SHARD)]
        records.append(write_shard(folder / f"shard-{s:06d}.tar", samples))
    write_manifest(folder, build_manifest(teacher_record(teacher.arch, str(weights), teacher), method=method,
                                          config={"seed": seed}, image_format="png", planned_samples=shards * PER_SHARD,
                                          shard_size=PER_SHARD, shards=records, complete=True))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_teacher_path):
    root = tmp_path_factory.mktemp("distill")
    teacher = create_model("lenet5", weights=str(tiny_teacher_path)).eval()
    return {"root": root, "shards": write_shard_folder(root / "shards", teacher, tiny_teacher_path)}


def config(data, out: Path, **overrides) -> TrainConfig:
    options = dict(shards=str(data["shards"]), student="lenet5_half", out=str(out), epochs=2, batch_size_per_rank=16,
                   workers=0, progress=False)
    return TrainConfig(**(options | overrides))


def read_metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- loss, schedule, augmentation
def test_kd_loss_matches_hand_computation():
    s, t, temperature = [1.0, 2.0, 0.5], [0.2, 3.0, -1.0], 4.0

    def softmax(z):
        e = [math.exp(v / temperature) for v in z]
        return [v / sum(e) for v in e]

    p_s, p_t = softmax(s), softmax(t)
    expected = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s)) * temperature ** 2
    batch = kd_loss(torch.tensor([s, t]), torch.tensor([t, t]), temperature)  # second row contributes 0
    assert batch.item() == pytest.approx(expected / 2, rel=1e-5)
    assert kd_loss(torch.tensor([t]), torch.tensor([t]), 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_warmup_cosine_schedule():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = warmup_cosine(optimizer, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert lrs[-1] < 0.05 and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_augmentations_shift_content_and_keep_shape():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1.0
    shifted = random_translate(x, 2)
    assert shifted.shape == x.shape and torch.equal(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))
    assert not all(torch.equal(a, x[0]) for a in shifted)
    filled = random_translate(torch.ones(8, 3, 8, 8), 3, fill=torch.full((1, 3, 1, 1), -1.0))
    assert set(filled.unique().tolist()) <= {-1.0, 1.0}
    assert random_crop_flip(torch.rand(4, 3, 32, 32), 4).shape == (4, 3, 32, 32)
    batch = Batch(x, torch.zeros(64, dtype=torch.int64), torch.zeros(64, 10))
    assert torch.equal(Augmentation("none", 16)(batch).images, x)
    assert Augmentation("crop-flip", 16)(batch).images.shape == x.shape
    # the pipeline augments uint8 pixels: the same draws give the same images as on floats
    pixels = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    for name in ("translate", "crop-flip"):
        torch.manual_seed(1)
        on_uint8 = Augmentation(name, 12)(batch._replace(images=pixels)).images
        torch.manual_seed(1)
        on_float = Augmentation(name, 12)(batch._replace(images=pixels.float() / 255)).images
        assert on_uint8.dtype == torch.uint8 and not torch.equal(on_uint8, pixels)
        assert torch.allclose(on_uint8.float() / 255, on_float)
    with pytest.raises(UserError, match="unknown augmentation"):
        Augmentation("rotate", 16)


def test_colour_jitter_keeps_dtype_and_range_and_changes_colours():
    from dfkd.distill.augment import colour_jitter

    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    out = colour_jitter(pixels)
    assert out.dtype == torch.uint8 and out.shape == pixels.shape and not torch.equal(out, pixels)
    floats = colour_jitter(pixels.float() / 255)
    assert floats.dtype == torch.float32 and 0 <= floats.min() and floats.max() <= 1
    assert torch.equal(colour_jitter(pixels, strength=0.0), pixels)   # factors of 1: the image itself
    grey = colour_jitter(torch.rand(4, 1, 8, 8))                      # 1 channel: brightness and contrast only
    assert grey.shape == (4, 1, 8, 8)
    # per image: two images of one batch get different factors
    same = pixels[:1].expand(8, -1, -1, -1).contiguous()
    assert len({colour_jitter(same)[i].float().mean().item() for i in range(8)}) > 1
    torch.manual_seed(3)
    batch = Batch(pixels, torch.zeros(32, dtype=torch.int64), torch.zeros(32, 10))
    assert Augmentation("crop-colour", 8)(batch).images.dtype == torch.uint8


# --------------------------------------------------------------------------- data pipeline
def test_shard_list_is_shuffled_before_the_rank_split():
    urls = [f"s{i}.tar" for i in range(8)]
    firsts = []
    for epoch in (0, 1):
        per_rank = []
        for rank in range(2):
            shard_list = EpochShardList(urls, seed=3, rank=rank, world_size=2)
            shard_list.epoch = epoch
            stream = iter(shard_list)
            per_rank.append([next(stream)["url"] for _ in range(4)])
        assert sorted(per_rank[0] + per_rank[1]) == urls  # one round: a partition across ranks
        firsts.append(per_rank[0])
    assert firsts[0] != firsts[1]  # a rank sees other shards in another epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_epochs_have_fixed_length_and_are_reproducible(data, workers):
    manifest = read_manifest(data["shards"])
    loader = ShardLoader(data["shards"], manifest, batch_size=10, workers=workers, aug="none", seed=1)
    assert len(loader) == SHARDS * PER_SHARD // 10
    epoch0 = list(loader.epoch(0))
    assert len(epoch0) == len(loader)
    batch = epoch0[0]
    assert batch.images.shape == (10, 1, 28, 28) and batch.images.dtype == torch.uint8
    stored = {s.key: s.image for path in sorted(data["shards"].glob("shard-*.tar")) for s in read_shard(path)}
    for image, index in zip(batch.images, batch.index.tolist()):  # the stored pixels, unchanged (aug none)
        assert np.array_equal(image.permute(1, 2, 0).numpy(), stored[f"sample-{index:08d}"])
    pixels = batch_to(batch.images, torch.device("cpu"), channels_last=False)
    assert pixels.dtype == torch.float32 and torch.equal(pixels, batch.images.float() / 255)
    assert batch.labels.dtype == torch.int64 and batch.logits.shape == (10, 10)
    assert torch.equal(batch.labels, batch.logits.argmax(1))  # labels/logits stay paired through the shuffle
    assert all(torch.equal(a.images, b.images) for a, b in zip(epoch0, loader.epoch(0)))
    assert not torch.equal(epoch0[0].images, next(loader.epoch(1)).images)


def test_loader_augments_the_same_sample_order(data):
    manifest = read_manifest(data["shards"])
    plain, shifted = (next(ShardLoader(data["shards"], manifest, batch_size=32, workers=0, aug=aug).epoch(0))
                      for aug in ("none", "translate"))
    assert torch.equal(plain.labels, shifted.labels) and torch.equal(plain.logits, shifted.logits)
    assert not torch.equal(plain.images, shifted.images)
    assert (shifted.images == 0).float().mean() > (plain.images == 0).float().mean()  # black borders


def test_loader_refuses_more_workers_than_shards(data):
    manifest = read_manifest(data["shards"])
    with pytest.raises(UserError, match="--workers 2"):
        ShardLoader(data["shards"], manifest, batch_size=8, workers=3)
    with pytest.raises(UserError, match="less than one batch"):
        ShardLoader(data["shards"], manifest, batch_size=1000, workers=0)


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("workers", [0, 1])
def test_train_writes_run_folder(data, tmp_path, workers):
    eval_options = dict(eval_data="mnist", data_root=str(REPO / "data")) if MNIST_CACHED and workers == 0 else {}
    metrics = train(config(data, tmp_path / "run", workers=workers, mixup=0.4, loss_options={"ce_weight": 0.5},
                           **eval_options))
    rows = read_metrics(tmp_path / "run")
    assert [int(r["epoch"]) for r in rows] == [1, 2] and int(rows[-1]["step"]) == 2 * (SHARDS * PER_SHARD // 16)
    assert list(rows[0]) == ["epoch", "step", "lr", "train_loss", "eval_top1", "seconds", "images_per_s", "loss_kd",
                            "loss_ce"]
    assert metrics["epochs"] == 2 and metrics["images_per_s"] > 0 and math.isfinite(metrics["train_loss"])
    if eval_options:
        assert 0 <= metrics["eval_top1"] <= 100 and metrics["teacher_top1"] is not None
    for name in ("config.json", "checkpoint.pt", "student.pt"):
        assert (tmp_path / "run" / name).is_file()
    student = load_model_checkpoint(tmp_path / "run" / "student.pt")
    assert student["arch"] == "lenet5_half" and student["input_spec"]["num_classes"] == 10


def test_resume_continues_where_it_stopped(data, tmp_path, killed_at_epoch):
    train(config(data, tmp_path / "straight"))
    with killed_at_epoch(2) as calls:
        train(config(data, tmp_path / "resumed"))
    assert [int(r["epoch"]) for r in read_metrics(tmp_path / "resumed")] == [1]
    metrics = train(config(data, tmp_path / "resumed", resume=True))
    assert calls == [0, 1] and metrics["epochs"] == 2
    assert [int(r["epoch"]) for r in read_metrics(tmp_path / "resumed")] == [1, 2]
    straight = load_model_checkpoint(tmp_path / "straight" / "student.pt")["state_dict"]
    resumed = load_model_checkpoint(tmp_path / "resumed" / "student.pt")["state_dict"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # bit-identical continuation

    with pytest.raises(UserError, match=r"other settings .*lr 0.05 -> 0.2"):
        train(config(data, tmp_path / "resumed", resume=True, lr=0.2))
    for change in ({"workers": 1}, {"persistent_workers": True}):  # same student recipe, other sample order
        name = next(iter(change))
        with pytest.raises(UserError, match=rf"other settings \({name} .* -> .*\) \(--{name.replace('_', '-')} "
                                            r"changes the sample order or augmentation draws.*resume with the same"):
            train(config(data, tmp_path / "resumed", resume=True, **change))
    with pytest.raises(UserError, match="already holds a run"):
        train(config(data, tmp_path / "resumed"))
    # --resume where there is nothing to resume yet starts the run (so a job script can always pass it)
    assert train(config(data, tmp_path / "fresh", resume=True, epochs=1))["epochs"] == 1


def test_teacher_weights_must_match_the_manifest(data, tmp_path):
    make_teacher(tmp_path / "other.pt", seed=1)
    with pytest.raises(UserError, match="another teacher"):
        train(config(data, tmp_path / "run", teacher_weights=str(tmp_path / "other.pt")))
    torch.manual_seed(7)  # a random teacher that seed 0 (recorded in the manifest) does not rebuild
    random_teacher = write_shard_folder(tmp_path / "random", create_model("lenet5").eval(), "none")
    with pytest.raises(UserError, match="randomly initialised lenet5"):
        train(config(data, tmp_path / "run2", shards=str(random_teacher)))


def test_random_smoke_teacher_is_rebuilt_from_the_recorded_seed(data, tmp_path):
    torch.manual_seed(0)  # as `synth generate --weights none --seed 0` builds it
    shards = write_shard_folder(tmp_path / "random", create_model("lenet5").eval(), "none")
    assert train(config(data, tmp_path / "run", shards=str(shards), epochs=1))["epochs"] == 1


def test_student_with_other_class_count_is_refused(data, tmp_path):
    save_model_checkpoint(tmp_path / "five.pt", create_model("lenet5_half", num_classes=5))
    with pytest.raises(UserError, match="5 classes"):
        train(config(data, tmp_path / "run", student_weights=str(tmp_path / "five.pt")))


def test_bad_shard_folders_are_user_errors(data, tmp_path):
    (tmp_path / "bare").mkdir()
    empty = Path(data["root"]) / "empty"
    if not empty.exists():
        empty.mkdir()
        manifest = read_manifest(data["shards"])
        manifest.shards, manifest.planned_samples = [], 0
        write_manifest(empty, manifest)
    for folder, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "bare", "no manifest.json"),
                            (empty, "no shards")):
        with pytest.raises(UserError, match=message):
            train(config(data, tmp_path / "run", shards=str(folder)))
    with pytest.raises(UserError, match="unknown model"):
        train(config(data, tmp_path / "run", student="no_such_net"))
    with pytest.raises(UserError, match="--temperature must be positive"):
        train(config(data, tmp_path / "run", loss_options={"temperature": 0}))


def test_damaged_shard_is_a_user_error(data, tmp_path):
    damaged = write_shard_folder(tmp_path / "damaged", make_teacher(tmp_path / "t.pt", seed=0), tmp_path / "t.pt")
    shard = damaged / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(UserError, match="shard-000001.tar"):
        train(config(data, tmp_path / "run", shards=str(damaged), workers=1))


# --------------------------------------------------------------------------- command line
def test_cli_prints_one_line_errors(data, tmp_path):
    runner = CliRunner()
    cases = [
        ["train", "--shards", str(tmp_path / "missing"), "--student", "lenet5_half", "--out", str(tmp_path / "a")],
        ["train", "--shards", str(data["shards"]), "--student", "lenet5_half", "--out", str(tmp_path / "b"),
         "--teacher-weights", str(tmp_path / "nope.pt")],
        ["train", "--shards", str(data["shards"]), "--student", "no_such_net", "--out", str(tmp_path / "c")],
    ]
    for args in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.strip().splitlines() if not line.startswith("recipe: ")]
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert runner.invoke(main, ["train", "--help"]).exit_code == 0


def test_cli_trains_and_python_m_reports_errors(data, tmp_path):
    result = CliRunner().invoke(main, ["train", "--shards", str(data["shards"]), "--student", "lenet5_half",
                                       "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size-per-rank", "16",
                                       "--workers", "1", "--opt", "adamw", "--aug", "crop-flip", "--threads", "1",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    start, done = result.output.strip().splitlines()  # the recipe's start line (stderr), then the result
    assert start.startswith("recipe: small-grey (auto: ") and done.startswith("done: eval_top1 None")
    assert read_metrics(tmp_path / "run")[0]["lr"]
    proc = subprocess.run([sys.executable, "-m", "dfkd.distill", "train", "--shards", str(tmp_path / "nothing"),
                           "--student", "lenet5_half", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.startswith("Error: ") and "Traceback" not in proc.stderr



def test_one_augmentation_table_serves_student_and_teacher():
    """distill.data.augmentation is the one table of augmentations by name: the student's Augmentation,
    the teacher trainer's --aug choices and its batches (a shift of --translate px, filled with `fill`)."""
    from dfkd.distill.augment import augmentation

    assert augmentation("none", 16) is None and augmentation("translate", 16, translate=0) is None
    x = torch.rand(6, 1, 16, 16)
    for name in ("translate", "crop", "crop-flip", "crop-colour"):
        torch.manual_seed(0)
        expected = Augmentation(name, 16)(Batch(x.clone(), torch.zeros(6), torch.zeros(6, 2))).images
        torch.manual_seed(0)
        assert torch.equal(augmentation(name, 16)(x.clone()), expected), name
    moved = augmentation("translate", 16, translate=3, fill=-5.0)(torch.zeros(64, 1, 16, 16))
    assert set(moved.unique().tolist()) <= {0.0, -5.0} and (moved == -5.0).any()  # uncovered pixels: the fill
    with pytest.raises(UserError, match="unknown augmentation 'rotate'"):
        augmentation("rotate", 16)


def test_teacher_trainer_takes_the_students_step(tmp_path, monkeypatch):
    """distill teacher updates through loop.optimizer_step, the student's step; with the disabled grad
    scaler it is exactly the plain backward, optimiser step and schedule step."""
    import dfkd.distill.teacher as teacher_module
    from dfkd.distill.engine import build_optimizer
    from dfkd.distill.loop import optimizer_step
    from dfkd.common.accel import grad_scaler

    nets = [torch.nn.Linear(4, 3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [build_optimizer(net, "sgd", 0.1, 5e-4) for net in nets]
    schedules = [warmup_cosine(opt, 10, 2) for opt in opts]
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(nets[0](x), y)
        opts[0].zero_grad(set_to_none=True)
        loss.backward()
        opts[0].step()
        schedules[0].step()
        optimizer_step(torch.nn.functional.cross_entropy(nets[1](x), y), opts[1], schedules[1],
                       grad_scaler("none", torch.device("cpu")))
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))
    steps = []
    monkeypatch.setattr(teacher_module, "optimizer_step", lambda *a, **k: steps.append(1) or optimizer_step(*a, **k))
    images = tmp_path / "images"
    for c in range(2):
        (images / str(c)).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((28, 28), 200 * c, np.uint8)).save(images / str(c) / f"{i}.png")
    train_teacher(TeacherConfig(model="lenet5", out=str(tmp_path / "t.pt"), data=str(images), epochs=2, batch_size=4,
                                workers=0, progress=False))
    assert len(steps) == 4  # 2 epochs of 8 images in batches of 4


def test_teacher_options_are_checked_by_their_declarations(tmp_path):
    for given, message in [({"lr": 0.0}, "--lr must be positive"), ({"aug": "rotate"}, "--aug must be one of auto"),
                           ({"translate": -1}, "--translate must be at least 0")]:
        with pytest.raises(UserError, match=message):
            train_teacher(TeacherConfig(model="lenet5", out=str(tmp_path / "t.pt"), **given))


# --------------------------------------------------------------------------- teacher
def test_teacher_trains_on_an_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("dark", "light")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 100, (28, 28), dtype=np.uint8) + 150 * c
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "images" / name / f"{i}.png")
    out = tmp_path / "teacher.pt"
    cfg = TeacherConfig(model="lenet5", out=str(out), data=str(tmp_path / "images"),
                        eval_data=str(tmp_path / "images"), epochs=2, batch_size=4, workers=0, progress=False)
    metrics = train_teacher(cfg)
    assert 0 <= metrics["test_top1"] <= 100 and metrics["epochs"] == 2
    teacher = create_model("lenet5", weights=str(out))
    assert teacher.input_spec.num_classes == 2
    with pytest.raises(UserError, match="exists"):
        train_teacher(cfg)
    with pytest.raises(UserError, match="ImageFolder"):
        train_teacher(TeacherConfig(model="lenet5", out=str(tmp_path / "t2.pt"), data=str(tmp_path / "nowhere")))
