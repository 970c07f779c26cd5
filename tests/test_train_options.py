"""The trainer's switches beyond the plain KD run: stored teacher logits, EMA, gradient clipping, label smoothing, bf16,
persistent workers (tiny shards, one process)."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from dfkd.common.errors import UserError
from dfkd.common.models import create_model, load_model_checkpoint
from dfkd.common.shards import read_manifest
from dfkd.common.accel import grad_scaler
from dfkd.common.options import make_config
from dfkd.distill.augment import Mixing
from dfkd.distill.data import Batch, ShardLoader
from dfkd.distill.loop import Step, train_one_epoch
from dfkd.distill.losses import LOSSES
from dfkd.distill.losses.kd import KD, KDConfig, kd_loss
from dfkd.distill.nets import Models
from dfkd.distill.engine import ModelEma
from dfkd.distill.train import TrainConfig, train

from test_distill import PER_SHARD, SHARDS, write_shard_folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_teacher_path):
    teacher = create_model("lenet5", weights=str(tiny_teacher_path)).eval()
    return write_shard_folder(tmp_path_factory.mktemp("options") / "shards", teacher, tiny_teacher_path, shards=4)


LOSS_OPTIONS = ("temperature", "ce_weight", "label_smoothing")   # the kd loss's own (KDConfig)
CPU = torch.device("cpu")


def config(shards, out, **overrides) -> TrainConfig:
    """A TrainConfig; the kd loss's options among `overrides` go to loss_options, as their flags do."""
    loss = {k: overrides.pop(k) for k in LOSS_OPTIONS if k in overrides}
    return TrainConfig(**dict(shards=str(shards), student="lenet5_half", out=str(out), epochs=2, batch_size_per_rank=16,
                              workers=0, progress=False) | overrides | ({"loss_options": loss} if loss else {}))


def test_stored_logits_need_the_stored_view(shards, tmp_path):
    with pytest.raises(UserError, match="--aug none --mixup 0"):  # (without aug and mixup they are set so)
        train(config(shards, tmp_path / "a", teacher_logits="stored", aug="translate"))
    with pytest.raises(UserError, match="--aug none --mixup 0"):
        train(config(shards, tmp_path / "b", teacher_logits="stored", aug="none", mixup=0.5))
    with pytest.raises(UserError, match="--cutmix 0"):
        train(config(shards, tmp_path / "c", teacher_logits="stored", aug="none", cutmix=1.0))


def test_cutmix_pastes_a_partner_box_and_lam_is_the_own_share():
    from dfkd.distill.augment import cutmix

    torch.manual_seed(0)
    images = torch.arange(16, dtype=torch.float32).view(16, 1, 1, 1).expand(16, 3, 12, 12).contiguous()
    mixed, perm, lam = cutmix(images, 1.0)
    assert mixed.shape == images.shape and lam.shape == (16,)
    for i in range(16):
        own = (mixed[i] == images[i, 0, 0, 0]).all(0).float().mean()   # pixels still the image's own value
        other = (mixed[i] == images[perm[i], 0, 0, 0]).all(0).float().mean()
        if perm[i] != i:
            assert torch.isclose(own, lam[i]) and torch.isclose(own + other, torch.tensor(1.0))
    assert (lam < 1).any() and ((lam >= 0) & (lam <= 1)).all()
    same, perm0, lam0 = cutmix(images, 0.0)
    assert torch.equal(same, images) and torch.equal(lam0, torch.ones(16))


def test_mix_switches_between_mixup_and_cutmix():
    from dfkd.distill.augment import Mixing

    images = torch.rand(64, 3, 8, 8)
    kinds = set()
    for seed in range(20):
        torch.manual_seed(seed)
        mixed, perm, lam = Mixing(mixup=1.0, cutmix=1.0)(images)
        hard = ((mixed == images) | (mixed == images[perm])).all()   # cutmix: every pixel is one of the pair's
        kinds.add("cutmix" if hard else "mixup")
    assert kinds == {"cutmix", "mixup"}
    torch.manual_seed(0)
    state = torch.get_rng_state()
    Mixing(mixup=1.0)(images)     # without cutmix: exactly mixup's draws (no extra coin)
    after_mix = torch.get_rng_state()
    torch.set_rng_state(state)
    from dfkd.distill.augment import mixup
    mixup(images, 1.0)
    assert torch.equal(after_mix, torch.get_rng_state())


def test_training_with_cutmix_and_colour_jitter_runs(shards, tmp_path):
    metrics = train(config(shards, tmp_path / "run", cutmix=1.0, mixup=1.0, aug="crop-colour", epochs=1))
    assert math.isfinite(metrics["train_loss"]) and metrics["epochs"] == 1


def test_stored_logits_are_the_targets_and_no_teacher_is_built(shards, tmp_path, monkeypatch):
    torch.manual_seed(0)
    student = create_model("lenet5_half")
    batch = Batch(torch.rand(8, 1, 28, 28), torch.zeros(8, dtype=torch.int64), torch.randn(8, 10))
    models = Models(student, student, None, None, grad_scaler("none", CPU))
    expected = kd_loss(student(student.input_spec.normalize(batch.images)), batch.logits, KDConfig().temperature)
    step = Step(KD(KDConfig()), Mixing(), CPU)
    loss = step.loss(step.logits(models, batch))["loss"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    import dfkd.distill.inputs as inputs_module

    def no_teacher(*args, **kwargs):
        raise AssertionError("stored logits must not build the teacher")

    monkeypatch.setattr(inputs_module, "load_teacher", no_teacher)
    metrics = train(config(shards, tmp_path / "run", teacher_logits="stored", aug="none"))
    assert metrics["epochs"] == 2 and metrics["teacher_top1"] is None
    with pytest.raises(AssertionError, match="must not build"):
        train(config(shards, tmp_path / "online"))


def test_ema_is_the_running_average_and_is_saved(shards, tmp_path):
    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.75)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, 0.75 * before["weight"] + 0.25 * model.weight)

    train(config(shards, tmp_path / "run", ema_decay=0.9, ce_weight=0.5, label_smoothing=0.1))
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert "ema_top1" in next(csv.reader(f))  # then the loss terms (loss_kd, ...)
    saved = load_model_checkpoint(tmp_path / "run" / "student_ema.pt")["state_dict"]
    plain = load_model_checkpoint(tmp_path / "run" / "student.pt")["state_dict"]
    assert saved.keys() == plain.keys() and not torch.equal(saved["head.2.weight"], plain["head.2.weight"])
    with pytest.raises(UserError, match="also pass --ce-weight"):
        train(config(shards, tmp_path / "ls", label_smoothing=0.1))


def _last_grad_norm(shards, tmp_path, clip: float) -> float:
    step = Step(KD(KDConfig()), Mixing(), CPU, clip_grad=clip)
    torch.manual_seed(0)
    teacher, student = create_model("lenet5").eval(), create_model("lenet5_half")
    models = Models(student, student, teacher, teacher.input_spec, grad_scaler("none", torch.device("cpu")))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loader = ShardLoader(shards, read_manifest(shards), 16, workers=0, aug="none")
    train_one_epoch(models, loader, optimizer, scheduler, step, 0, 1, show=False)
    return torch.cat([p.grad.flatten() for p in student.parameters()]).norm().item()


def test_gradient_clipping_bounds_the_gradient_norm(shards, tmp_path):
    assert _last_grad_norm(shards, tmp_path, 0.0) > 1e-3
    assert _last_grad_norm(shards, tmp_path, 1e-3) <= 1e-3 * 1.0001


def test_bf16_autocast_trains_on_the_cpu_and_fp16_needs_a_gpu(shards, tmp_path):
    metrics = train(config(shards, tmp_path / "bf16", amp="bf16", channels_last=True, epochs=1))
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
            train(config(shards, tmp_path / "fp16", amp="fp16"))


def test_persistent_workers_follow_the_epochs(shards):
    manifest = read_manifest(shards)

    def orders(persistent: bool) -> list[list[int]]:
        loader = ShardLoader(shards, manifest, batch_size=8, workers=2, aug="none", seed=3,
                             persistent_workers=persistent)
        return [torch.cat([b.index for b in loader.epoch(e)]).tolist() for e in (0, 1, 0)]

    persistent, fresh = orders(True), orders(False)
    assert persistent == fresh  # the same sample order per epoch as workers started per epoch
    assert persistent[0] != persistent[1] and persistent[0] == persistent[2]
    assert len(persistent[0]) == SHARDS * 2 * PER_SHARD // 8 * 8


@pytest.mark.parametrize("overrides, message", [
    ({"temperature": 0}, "--temperature must be positive"), ({"lr": -0.1}, "--lr must be positive"),
    ({"opt": "lbfgs"}, "--opt must be one of sgd, adamw"), ({"wd": -1.0}, "--wd must be at least 0"),
    ({"epochs": 0}, "--epochs must be at least 1"), ({"mixup": -1.0}, "--mixup must be at least 0"),
    ({"ema_decay": 1.0}, "--ema-decay must be below 1"), ({"label_smoothing": 1.0, "ce_weight": 1.0},
                                                         "--label-smoothing must be below 1"),
    ({"aug": "rotate"}, "--aug must be one of"), ({"amp": "fp8"}, "--amp must be one of"),
    ({"warmup_epochs": 3.0}, "--warmup-epochs must not exceed --epochs"),
    ({"label_smoothing": 0.1}, "also pass --ce-weight > 0"),
])
def test_resolved_refuses_what_the_declarations_or_their_combination_do_not_allow(shards, tmp_path, overrides, message):
    """resolved() checks each value against its declaration (no second copy of the ranges) and then the
    combinations no single declaration can express."""
    loss = {k: overrides.pop(k) for k in LOSS_OPTIONS if k in overrides}
    with pytest.raises(UserError, match=message):
        config(shards, tmp_path, **overrides).resolved()
        make_config(KDConfig, loss)   # the loss's options: checked by their own declarations
    assert config(shards, tmp_path).resolved().lr == 0.1   # the untouched config passes (and gets sgd's lr)

# --------------------------------------------------------------------------- loss registry
def test_kd_loss_terms_add_up_to_the_loss(shards, tmp_path):
    torch.manual_seed(0)
    student, teacher = create_model("lenet5_half"), create_model("lenet5").eval()
    batch = Batch(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.randn(8, 10))
    models = Models(student, student, teacher, teacher.input_spec, grad_scaler("none", torch.device("cpu")))
    for ce_weight, names in ((0.0, {"loss", "kd"}), (0.5, {"loss", "kd", "ce"})):
        loss = LOSSES["kd"](KDConfig(ce_weight=ce_weight, label_smoothing=0.1 * (ce_weight > 0)))
        terms = loss(Step(loss, Mixing(mixup=1.0), CPU).logits(models, batch))
        assert set(terms) == names
        assert terms["loss"].item() == pytest.approx(sum(v.item() for k, v in terms.items() if k != "loss"), rel=1e-6)
    with pytest.raises(UserError, match="--loss must be one of kd"):
        config(shards, tmp_path, loss="nope").resolved()


def test_steps_and_metrics_log_every_loss_term(shards, tmp_path):
    train(config(shards, tmp_path / "run", ce_weight=0.5))
    with open(tmp_path / "run" / "steps.csv") as f:
        steps = list(csv.DictReader(f))
    assert list(steps[0]) == ["epoch", "step", "lr", "train_loss", "loss_kd", "loss_ce"]
    for row in steps:
        assert float(row["train_loss"]) == pytest.approx(float(row["loss_kd"]) + float(row["loss_ce"]), rel=1e-5)
    with open(tmp_path / "run" / "metrics.csv") as f:
        epochs = list(csv.DictReader(f))
    assert len(epochs) == 2 and all(float(r["train_loss"]) == pytest.approx(float(r["loss_kd"]) + float(r["loss_ce"]),
                                                                          rel=1e-5) for r in epochs)


def test_none_means_none_for_optional_path_options():
    """`--eval-data none` (and --teacher-weights none) mean no value, as their help says, not a folder named none."""
    from dfkd.common.options import options_of, parse_value
    from dfkd.distill.config import TrainConfig

    specs = {s.name: s for s in options_of(TrainConfig)}
    assert parse_value(specs["eval_data"], "none") is None
    assert parse_value(specs["teacher_weights"], "None") is None
    assert parse_value(specs["eval_data"], "mnist") == "mnist"


# --------------------------------------------------------------------------- plug-ins: a new loss, a new augmentation
def test_a_loss_registered_in_one_entry_trains_with_its_own_options(shards, tmp_path, monkeypatch):
    """A loss is one class (as one file in distill/losses/ would hold) and one entry in LOSSES: its own options
    (declared with option()) are checked, recorded flat in config.json beside TrainConfig's, and its terms logged."""
    from dataclasses import dataclass

    from dfkd.common.options import option
    from dfkd.distill.losses.base import Logits, Loss

    @dataclass
    class L1Config:
        weight: float = option(1.0, min=0, group="Loss and regularisation", help="Weight of the L1 term.")

    class L1(Loss):
        name, Config = "l1", L1Config

        def __call__(self, logits: Logits) -> dict[str, torch.Tensor]:
            l1 = self.config.weight * (logits.student - logits.teacher).abs().mean()
            return {"loss": l1, "l1": l1}

    monkeypatch.setitem(LOSSES, "l1", L1)
    train(config(shards, tmp_path / "run", loss="l1", loss_options={"weight": 0.5}, epochs=1))
    with open(tmp_path / "run" / "metrics.csv") as f:
        assert "loss_l1" in next(csv.reader(f))
    import json
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["loss"] == "l1" and saved["weight"] == 0.5 and "temperature" not in saved
    with pytest.raises(UserError, match="weight must be at least 0"):
        train(config(shards, tmp_path / "bad", loss="l1", loss_options={"weight": -1.0}))


def test_an_augmentation_registered_in_one_entry_is_an_aug_choice(shards, tmp_path, monkeypatch):
    """An augmentation is one entry in AUGMENTATIONS: `distill train --aug NAME` takes it (the table is read when
    the option is checked) and the pipeline applies it."""
    from click.testing import CliRunner

    from dfkd.distill.augment import AUGMENTATIONS, Augment
    from dfkd.distill.cli import main

    calls = []
    monkeypatch.setitem(AUGMENTATIONS, "invert", Augment("255 - x", lambda x, px, fill: calls.append(px) or 255 - x))
    args = ["train", "--shards", str(shards), "--student", "lenet5_half", "--epochs", "1", "--batch-size-per-rank",
            "16", "--workers", "0", "--quiet", "--threads", "1"]
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "run"), "--aug", "invert"])
    assert result.exit_code == 0, result.output
    assert calls and calls[0] == 28 // 8
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "bad"), "--aug", "rotate"])
    assert result.exit_code != 0 and "--aug must be one of none, translate, crop, crop-flip, crop-colour, invert" in \
        result.output
