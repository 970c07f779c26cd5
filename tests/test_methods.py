"""MUSE, DeepInversion and the adversarial term: loss pieces against hand computations, and each method
writing valid, deterministic shards from a tiny teacher."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd.synth.cam import ClassActivationMaps, cam_coverage
from dfkd.common.errors import UserError
from dfkd.common.fileio import canonical_json_sha256
from dfkd.common.models import InputSpec, create_model
from dfkd.common.shards import read_manifest, read_shard, verify_dataset
from dfkd.synth.generate import GenerateConfig, generate
from dfkd.synth.methods import method_from_options
from dfkd.synth.methods.deepinversion import jitter_flip, tv_l2
from dfkd.synth.methods.generator import masked_disagreement, seeded_generator, training_labels
from dfkd.synth.methods.muse import class_embeddings, noisy_embeddings


class GapLinear(nn.Module):
    """conv -> ReLU -> global average pool -> linear: the textbook CAM model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1, bias=False)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.act(self.conv(x))), 1))


def test_cam_of_gap_linear_head_is_zhou_cam():
    torch.manual_seed(0)
    model = GapLinear()
    x = torch.randn(2, 1, 4, 5, requires_grad=True)
    labels = torch.tensor([0, 1])
    with ClassActivationMaps(model) as cams:
        logits = model(x)
        cam = cams.maps(logits, labels)
    a = F.relu(model.conv(x)).detach()                       # (B, K, h, w)
    w = model.fc.weight.detach()                              # (classes, K)
    expected = torch.stack([F.relu(torch.einsum("k,khw->hw", w[y], a[i])) for i, y in enumerate(labels)]) / 20
    assert cam.shape == (2, 4, 5)
    torch.testing.assert_close(cam, expected)
    cam.sum().backward()                                      # differentiable w.r.t. the input
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_cam_falls_back_to_grad_cam_for_mlp_head_and_refuses_mlp_only_models():
    lenet = create_model("lenet5").eval()
    x = torch.randn(3, 1, 28, 28, requires_grad=True)
    with ClassActivationMaps(lenet) as cams:
        cam = cams.maps(lenet(x), torch.tensor([1, 2, 3]))
    # lenet5's last conv map at 28 px is 1 x 1, so the map is taken after conv2 (10 x 10)
    assert cam.shape == (3, 10, 10) and (cam >= 0).all() and cam.sum() > 0
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with ClassActivationMaps(mlp) as cams, pytest.raises(UserError, match="convolutional teacher"):
        cams.maps(mlp(torch.randn(2, 1, 4, 4)), torch.tensor([0, 1]))


def test_cam_coverage_is_mean_over_max():
    flat = torch.ones(1, 4, 4)
    spot = torch.zeros(1, 4, 4)
    spot[0, 1, 2] = 3.0
    torch.testing.assert_close(cam_coverage(torch.cat([flat, spot])), torch.tensor([1.0, 1 / 16]))


def test_class_embeddings_and_noisy_layer(tmp_path):
    e = class_embeddings("orthogonal", 10, 16)
    torch.testing.assert_close(e @ e.T, 16 * torch.eye(10), atol=1e-4, rtol=0)
    assert torch.equal(noisy_embeddings(e, 0.0, None), e)
    u1 = noisy_embeddings(e[[3, 3]], 0.5, torch.Generator().manual_seed(1))
    u2 = noisy_embeddings(e[[3, 3]], 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(u1, u2) and not torch.allclose(u1[0], u1[1])     # seeded, and fresh per image
    good = tmp_path / "text.npy"
    np.save(good, np.random.default_rng(0).normal(size=(10, 300)).astype(np.float32))
    assert class_embeddings(str(good), 10, 16).shape == (10, 16)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.array([{"a": 1}] * 10, dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="cannot read class embeddings"):
        class_embeddings(str(bad), 10, 16)
    np.save(bad, np.zeros((9, 4), np.float32))
    with pytest.raises(UserError, match=r"shape \(10, dim\)"):
        class_embeddings(str(bad), 10, 16)


def _muse(spec, **options):
    base = {"steps": "1", "train_batch_size": "8", "width": "4", "latent_dim": "8"}
    base.update(options)
    return method_from_options("muse", base, spec, 100)


def test_muse_generates_low_resolution_and_upsamples_for_the_teacher_and_the_shards():
    spec = InputSpec(3, 32, (0.5,) * 3, (0.25,) * 3, 10)
    method = _muse(spec)
    assert method.num_streams == 3 and [method.stream_resolution(k) for k in range(3)] == [8, 16, 32]
    gen = method._new_generator(0)
    z, y = torch.randn(4, 8), torch.arange(4)
    native, teacher_view = method._render(0, gen, z, y, torch.Generator().manual_seed(0))
    assert native.shape == (4, 3, 8, 8) and teacher_view.shape == (4, 3, 32, 32)
    torch.testing.assert_close(teacher_view, F.interpolate(native, size=(32, 32), mode="bilinear",
                                                           align_corners=False).clamp(0, 1))
    native_method = _muse(spec, teacher_input="native")
    assert native_method._render(0, gen, z, y, None)[1].shape == (4, 3, 8, 8)
    with pytest.raises(UserError, match="upsample_mode"):
        _muse(spec, upsample_mode="area")
    with pytest.raises(UserError, match="scales"):
        _muse(spec, scales="0,1")


def test_muse_splits_its_generators_across_ranks_like_the_ensemble(tiny_teacher_path, tmp_path):
    """Under torchrun rank r trains streams r, r + N, ... before the barrier, then loads the others; the
    ensemble equals the one a single process trains."""
    teacher = create_model("lenet5", weights=str(tiny_teacher_path)).eval().requires_grad_(False)
    spec = teacher.input_spec
    single = _muse(spec, steps="2")
    single.fit(teacher, tmp_path / "single", progress=False)
    trained_before_barrier = []
    rank1 = _muse(spec, steps="2")
    rank1.fit_parallel(teacher, tmp_path / "split", False, 0, rank=1, world_size=2,
                       barrier=lambda: trained_before_barrier.extend(sorted(p.name for p in (tmp_path / "split").iterdir())))
    assert trained_before_barrier == ["generator-001.pt"]   # streams 0 and 2 are rank 0's
    for a, b in zip(single.generators, rank1.generators):   # after the barrier it fills in the rest
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(UserError, match="cannot take 7 px"):   # the input check runs on every rank
        _muse(spec, teacher_input="native").fit_parallel(teacher, tmp_path / "n", False, 0, 1, 2, lambda: None)


def test_muse_native_input_refused_for_a_teacher_that_cannot_take_it(tiny_teacher_path, tmp_path):
    cfg = GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path), out=str(tmp_path / "o"), method="muse",
                         method_options={"steps": "1", "train_batch_size": "8", "width": "4", "latent_dim": "8",
                                         "teacher_input": "native"},
                         num_images=10, shard_size=10, progress=False)
    with pytest.raises(UserError, match="cannot take 7 px"):
        generate(cfg)


def test_deepinversion_priors_by_hand():
    x = torch.zeros(1, 1, 3, 3)
    x[..., :, 2] = 1.0                                        # a vertical edge between columns 1 and 2
    # right: 3 differences of 1; down: 0; diagonals: 2 each
    torch.testing.assert_close(tv_l2(x), torch.tensor(3 ** 0.5 + 0 + 2 ** 0.5 + 2 ** 0.5))
    img = torch.arange(16.0).view(1, 1, 4, 4)
    a = jitter_flip(img, 1, True, torch.Generator().manual_seed(3))
    b = jitter_flip(img, 1, True, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and sorted(a.flatten().tolist()) == list(range(16))


def test_deepinversion_loss_terms_combine_with_their_weights(tiny_teacher_path):
    from dfkd.synth.bn_stats import BNStatsLoss

    teacher = create_model("lenet5", weights=str(tiny_teacher_path)).eval()
    method = method_from_options("deepinversion", {"bn_weight": "0.5", "tv_weight": "0.1", "l2_weight": "0.01"},
                          teacher.input_spec, 10)
    method.fit(teacher, None)
    x = torch.randn(4, 1, 28, 28)
    with BNStatsLoss(teacher, 10.0) as bn:
        t = method.loss_terms(x, torch.tensor([0, 1, 2, 3]), bn)
    torch.testing.assert_close(t["tv"], tv_l2(x))
    torch.testing.assert_close(t["l2"], x.norm())
    torch.testing.assert_close(t["total"], t["ce"] + 0.5 * t["bn"] + 0.1 * t["tv"] + 0.01 * t["l2"])


def test_deepinversion_lowers_its_loss(tiny_teacher_path):
    teacher = create_model("lenet5", weights=str(tiny_teacher_path)).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    method = method_from_options("deepinversion", {"iterations": "25", "flip": "false"}, teacher.input_spec, 10)
    method.fit(teacher, None)
    labels = torch.arange(8) % 10
    from dfkd.synth.bn_stats import BNStatsLoss

    def loss_of(images):
        with torch.no_grad(), BNStatsLoss(teacher, 10.0) as bn:
            return method.loss_terms(teacher.input_spec.normalize(images), labels, bn)["total"].item()

    start = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    lo, hi = method._bounds()
    start = torch.max(torch.min(start, hi), lo) * 0.3081 + 0.1307
    out = method.synthesize(labels, torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(5))
    assert out.shape == (8, 1, 28, 28) and 0 <= out.min() and out.max() <= 1
    assert loss_of(out) < 0.95 * loss_of(start)      # a random tiny teacher: CE stays near chance


def test_masked_disagreement_counts_only_agreeing_images():
    t = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    s_agree = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s_disagree = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    kl = F.kl_div(F.log_softmax(s_agree, 1), F.log_softmax(t, 1), reduction="none", log_target=True).sum(1)
    torch.testing.assert_close(masked_disagreement(s_agree, t), kl.mean())
    assert masked_disagreement(s_disagree, t).item() == 0.0
    mixed = torch.stack([s_agree[0], s_disagree[1]])
    torch.testing.assert_close(masked_disagreement(mixed, t), kl[0] / 2)


@pytest.mark.parametrize("batch,classes", [(100, 100), (64, 1000), (8, 10), (256, 100), (200, 10), (100, 10)])
def test_generator_training_batches_take_every_class_in_turn(batch, classes):
    """A half batch smaller than the class count (ImageNet's 1,000 classes at 64, 100 at 100) still trains every
    class: the next half-batch of classes each step, evenly over the steps; image i + half repeats image i's
    label. Where the half batch is a multiple of the class count, every step is the pattern it always was."""
    half = batch // 2
    cycle = classes // math.gcd(half, classes)   # steps after which every class has come equally often
    steps = [training_labels(step, batch, classes) for step in range(cycle)]
    for labels in steps:
        assert labels.shape == (batch,) and torch.equal(labels[:half], labels[half:])
    covered = torch.cat(steps[:-(-classes // half)])
    assert set(covered.tolist()) == set(range(classes))
    counts = torch.bincount(torch.cat(steps), minlength=classes)
    assert counts.min() == counts.max()
    if half % classes == 0:
        assert all(torch.equal(labels, torch.arange(batch) % half % classes) for labels in steps)


def test_every_class_embedding_of_the_ensemble_trains_when_the_batch_holds_fewer_classes(tmp_path):
    """20 classes at a training batch of 8 (4 per half): after 5 steps every class's embedding has moved."""
    teacher = create_model("lenet5", num_classes=20).eval().requires_grad_(False)
    method = method_from_options("generator", {"num_generators": "1", "steps": "5", "train_batch_size": "8",
                                               "width": "4", "latent_dim": "8"}, teacher.input_spec, 100)
    torch.manual_seed(seeded_generator(0, 0).initial_seed())   # as the ensemble seeds member 0
    start = method._new_generator(0).embed.weight.detach().clone()
    method.fit(teacher, tmp_path, progress=False)
    moved = (method.generators[0].embed.weight.detach() - start).abs().sum(1) > 0
    assert moved.all(), f"classes never trained: {(~moved).nonzero().flatten().tolist()}"


@pytest.mark.parametrize("method", ["generator", "muse"])
def test_proxy_student_defaults_to_a_small_model_for_the_teachers_input(method):
    """`auto` resolves before the config is recorded: a LeNet teacher keeps lenet5_half (the MNIST recipe's
    config, so its shards are unchanged), a 32 px RGB ResNet gets cifar_resnet8, an ImageNet-size one resnet18;
    a proxy given by name is kept."""
    def proxy(model, **options):
        spec = create_model(model, weights="none").input_spec
        return method_from_options(method, {"adversarial_weight": "1", **options}, spec, 100).config.proxy_student

    assert proxy("lenet5") == "lenet5_half"
    assert proxy("cifar_resnet20") == "cifar_resnet8"
    assert proxy("resnet50") == "resnet18"
    assert proxy("cifar_resnet20", proxy_student="cifar_resnet14") == "cifar_resnet14"


def test_adversarial_proxy_of_an_rgb_resnet_teacher_is_not_a_lenet(tmp_path):
    """What `synth generate --set adversarial_weight=1` trains next to a 3-channel 32 px ResNet teacher."""
    generate(GenerateConfig(teacher="cifar_resnet8", weights="none", out=str(tmp_path / "s"), num_images=4,
                            shard_size=4, write_batch_size=4, progress=False,
                            method_options={"num_generators": "1", "steps": "1", "train_batch_size": "4", "width": "4",
                                            "latent_dim": "8", "adversarial_weight": "1"}))
    manifest = read_manifest(tmp_path / "s")
    assert manifest.config["method_config"]["proxy_student"] == "cifar_resnet8"
    state = torch.load(next((tmp_path / "s" / "state").glob("*.pt")), weights_only=True)
    assert state["proxy"]["conv1.weight"].shape == (16, 3, 3, 3)   # CifarResNet's stem, on RGB input


def test_the_contrastive_loss_is_ln_batch_when_nothing_tells_images_apart_and_falls_as_they_separate():
    """CMI's InfoNCE over the batch: identical features for every image give ln(B) (a crop matches any image as
    well as its own); distinct features give less; a crop is a differentiable resampling of its image."""
    from dfkd.synth.methods.base import seeded_generator
    from dfkd.synth.methods.generator import ProjectionHead, contrastive_loss, random_resized_crops

    torch.manual_seed(0)
    head = ProjectionHead(16)
    same = torch.randn(1, 16).repeat(8, 1)
    assert contrastive_loss(head, same, same).item() == pytest.approx(math.log(8), abs=1e-5)
    apart = torch.randn(8, 16) * 5
    assert contrastive_loss(head, apart, apart).item() < math.log(8) - 1
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    crops = random_resized_crops(x, seeded_generator(0, 1))
    assert crops.shape == x.shape and torch.equal(crops, random_resized_crops(x, seeded_generator(0, 1)))
    assert not torch.equal(crops, random_resized_crops(x, seeded_generator(0, 2)))
    crops.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_the_contrastive_term_trains_a_head_kept_in_the_checkpoint_and_changes_the_images(tiny_teacher_path,
                                                                                          tmp_path):
    """`--set contrastive_weight=1`: the term is trained (its head is in each generator's checkpoint and moved
    from its initial weights), the shards are valid and differ from the same run without the term; a checkpoint
    or manifest written before the option was declared (no contrastive_weight recorded) resumes as the default."""
    options = {"num_generators": "1", "steps": "4", "train_batch_size": "8", "width": "4", "latent_dim": "8",
               "checkpoint_every": "2"}

    def run(out, **extra):
        return generate(GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path), out=str(out),
                                       method_options={**options, **extra}, num_images=16, shard_size=8,
                                       write_batch_size=8, image_format="npy", progress=False, recipe="none"))

    with_term, without = run(tmp_path / "con", contrastive_weight="1"), run(tmp_path / "plain")
    assert verify_dataset(tmp_path / "con") == []
    assert [s.sha256 for s in with_term.shards] != [s.sha256 for s in without.shards]
    state = torch.load(tmp_path / "con" / "state" / "generator-000.pt", weights_only=True)
    head = {k: v for k, v in state["generator"].items() if k.startswith("contrast_head.")}
    assert head and head["contrast_head.2.weight"].shape == (128, 84)   # LeNet-5's penultimate: 84 features
    plain_state = torch.load(tmp_path / "plain" / "state" / "generator-000.pt", weights_only=True)
    assert not any(k.startswith("contrast_head.") for k in plain_state["generator"])
    # what an earlier version wrote: no contrastive_weight in the checkpoint's or the manifest's method options
    del plain_state["config"]["contrastive_weight"]
    torch.save(plain_state, tmp_path / "plain" / "state" / "generator-000.pt")
    manifest_path = tmp_path / "plain" / "manifest.json"
    recorded = json.loads(manifest_path.read_text())
    del recorded["config"]["method_config"]["contrastive_weight"]
    recorded["config_sha256"] = canonical_json_sha256(recorded["config"])
    manifest_path.write_text(json.dumps(recorded))
    again = run(tmp_path / "plain")   # the same settings: nothing to redo, not "made with other settings"
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in without.shards]
    teacher = create_model("lenet5", weights=str(tiny_teacher_path)).eval().requires_grad_(False)
    method = method_from_options("generator", options, teacher.input_spec, 16)
    method.fit(teacher, tmp_path / "plain" / "state", progress=False)   # restored, not refused or retrained
    assert all(torch.equal(v, plain_state["generator"][k]) for k, v in method.generators[0].state_dict().items())


TINY_OPTIONS = {
    "muse": {"steps": "3", "train_batch_size": "8", "width": "4", "latent_dim": "8", "checkpoint_every": "2"},
    "deepinversion": {"iterations": "3", "flip": "false"},
    "generator": {"num_generators": "1", "steps": "3", "train_batch_size": "8", "width": "4", "latent_dim": "8",
                  "adversarial_weight": "0.5"},
}


@pytest.mark.parametrize("method", sorted(TINY_OPTIONS))
def test_method_writes_valid_deterministic_shards(method, tiny_teacher_path, tmp_path):
    def run(out):
        return generate(GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path), out=str(out),
                                       method=method, method_options=dict(TINY_OPTIONS[method]),
                                       num_images=24, shard_size=12, write_batch_size=12, image_format="npy",
                                       progress=False))

    m1, m2 = run(tmp_path / "a"), run(tmp_path / "b")
    assert verify_dataset(tmp_path / "a") == []
    assert [s.sha256 for s in m1.shards] == [s.sha256 for s in m2.shards]
    samples = list(read_shard(tmp_path / "a" / "shard-000000.tar"))
    assert [s.label for s in samples] == [i % 10 for i in range(12)]
    assert samples[0].image.shape == (28, 28, 1)
    if method == "muse":   # images 0-9 come from stream 0 (7 px), 10-19 stream 1 (14 px), 20-23 stream 2
        samples += list(read_shard(tmp_path / "a" / "shard-000001.tar"))
        assert [s.meta["resolution"] for s in samples[::10]] == [7, 14, 28]


def test_muse_killed_during_generator_training_resumes_to_identical_bytes(tiny_teacher_path, tmp_path):
    """MUSE's checkpoints (tuple-valued config, fixed embeddings) resume like the generator ensemble's."""
    from test_faults import KILLED, run_forked

    def config(out):
        return GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path), out=str(out), method="muse",
                              method_options=dict(TINY_OPTIONS["muse"], steps="4"), num_images=24,
                              shard_size=12, write_batch_size=12, image_format="npy", progress=False)

    reference = generate(config(tmp_path / "ref"))
    code, message = run_forked(lambda: generate(config(tmp_path / "out")), fault="generator-step:7")
    assert code == KILLED, message              # killed in the second stream, after its step-2 checkpoint
    resumed = generate(config(tmp_path / "out"))
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in reference.shards]
