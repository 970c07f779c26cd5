"""Stage one's compute path: the device option, concurrent generator training (== sequential), the
writer pool (bytes independent of its size), logits of lossy shards, the config hash of byte-changing
options, the speed switches on the CPU; GPU checks that skip without CUDA."""
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dfkd.common.errors import UserError
from dfkd.common.models import create_model
from dfkd.common.shards import read_manifest, read_shard, verify_dataset
from dfkd.synth.cli import main as synth_cli
from dfkd.synth.generate import GenerateConfig, generate
from dfkd.synth.methods import method_from_options

TINY = {"num_generators": "3", "steps": "5", "train_batch_size": "12", "width": "4", "latent_dim": "8",
        "feature_diversity_weight": "2", "checkpoint_every": "2"}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _config(teacher, out, **kw):
    base = dict(teacher="lenet5", weights=str(teacher), out=str(out), method_options=dict(TINY), num_images=60,
                shard_size=25, write_batch_size=16, progress=False, device="cpu", write_workers=0)
    base.update(kw)
    return GenerateConfig(**base)


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob("shard-*.tar"))}


def _teacher(path):
    return create_model("lenet5", weights=str(path)).eval().requires_grad_(False)


def _cifar_teacher():
    torch.manual_seed(1)
    teacher = create_model("cifar_resnet8", num_classes=10)
    teacher.train()
    with torch.no_grad():
        for _ in range(2):
            teacher(torch.randn(32, 3, 32, 32))
    return teacher.eval().requires_grad_(False)


# --------------------------------------------------------------------------- concurrent generator training
@pytest.mark.parametrize("case", ["ensemble", "adversarial", "contrastive", "muse-native", "muse-native-adversarial",
                                  "muse-native-contrastive"])
def test_concurrent_generators_train_exactly_as_one_at_a_time(case, tiny_teacher_path, tmp_path):
    """All generators sharing each teacher pass against each generator trained alone, one after the other:
    every generator's per-step loss terms and final weights are bit-identical on the CPU."""
    if case.startswith("muse-native"):  # streams 16, 32, 16, 32 px: passes [0, 2] and [1, 3]
        name, teacher, options = "muse", _cifar_teacher(), {"steps": "3", "train_batch_size": "8", "width": "4",
                                                            "latent_dim": "8", "num_generators": "2",
                                                            "teacher_input": "native", "scales": "0.5,1"}
        if case.endswith("adversarial"):
            options["adversarial_weight"] = "1"
        if case.endswith("contrastive"):
            options["contrastive_weight"] = "1"
    else:
        name, teacher, options = "generator", _teacher(tiny_teacher_path), dict(TINY)
        if case == "adversarial":
            options.update(adversarial_weight="1", steps="3")
        if case == "contrastive":
            options.update(contrastive_weight="1", steps="3")
    runs = {}
    for mode in ("together", "alone"):
        method = method_from_options(name, options, teacher.input_spec, 100)
        terms = []
        original = method._forward_backward

        def recording(part, *args, original=original, terms=terms):
            outputs = original(part, *args)
            terms.extend((m.k, {n: v.item() for n, v in out[0].items()}) for m, out in zip(part, outputs))
            return outputs
        method._forward_backward = recording
        state = tmp_path / f"{case}-{mode}"
        if mode == "together":
            method.fit(teacher, state, progress=False)
        else:  # each generator trained on its own, one after the other (the previous version's loop)
            for k in range(method.num_streams):
                method._fit_generators([k], teacher, state, False, 0)
        runs[mode] = (sorted(terms, key=lambda t: t[0]), [g.state_dict() for g in method.generators])
    (terms_together, weights_together), (terms_alone, weights_alone) = runs["together"], runs["alone"]
    assert len(terms_together) == len(terms_alone) > 0
    assert terms_together == terms_alone
    for a, b in zip(weights_together, weights_alone):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_concurrent_training_resumes_generators_at_different_steps(tiny_teacher_path, tmp_path):
    """Generators whose checkpoints stand at different steps (another rank split, a kill) each continue from
    their own step and end as in an uninterrupted run."""
    teacher = _teacher(tiny_teacher_path)
    reference = method_from_options("generator", TINY, teacher.input_spec, 100)
    reference.fit(teacher, tmp_path / "ref", progress=False)
    state = tmp_path / "mixed"
    # generator 2 finished, generator 0 killed after its step-2 checkpoint, generator 1 never started
    method_from_options("generator", TINY, teacher.input_spec, 100)._fit_generators([2], teacher, state, False, 0)
    early = method_from_options("generator", TINY, teacher.input_spec, 100)
    original_save = early._save

    def save_then_stop(m, step):
        original_save(m, step)
        if step == 2:
            raise KeyboardInterrupt
    early._save = save_then_stop
    with pytest.raises(KeyboardInterrupt):
        early._fit_generators([0], teacher, state, False, 0)
    resumed = method_from_options("generator", TINY, teacher.input_spec, 100)
    resumed.fit(teacher, state, progress=False)
    for a, b in zip(resumed.generators, reference.generators):
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_out_of_memory_halves_the_group_and_keeps_the_result(tiny_teacher_path, tmp_path):
    """A GPU that cannot hold every generator's batch at once: the step is redone in smaller groups (the
    result does not depend on the grouping); with an explicit group size it is a one-line error."""
    teacher = _teacher(tiny_teacher_path)
    reference = method_from_options("generator", TINY, teacher.input_spec, 100)
    reference.fit(teacher, tmp_path / "ref", progress=False)

    def small_memory(method):
        original, sizes = method._forward_backward, []

        def forward_backward(part, *args):
            sizes.append(len(part))
            if len(part) > 1:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return original(part, *args)
        method._forward_backward = forward_backward
        return sizes

    auto = method_from_options("generator", TINY, teacher.input_spec, 100)
    sizes = small_memory(auto)
    auto.fit(teacher, tmp_path / "auto", progress=False)
    assert sizes[:3] == [3, 1, 1] and set(sizes[3:]) == {1}   # 3 -> 1 after one refusal, and it stays
    for a, b in zip(auto.generators, reference.generators):
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    fixed = method_from_options("generator", {**TINY, "concurrent_generators": "2"}, teacher.input_spec, 100)
    small_memory(fixed)
    with pytest.raises(UserError, match="out of GPU memory training 2 generator.*concurrent_generators"):
        fixed.fit(teacher, tmp_path / "fixed", progress=False)


# --------------------------------------------------------------------------- the writer pool
@pytest.mark.parametrize("image_format", ["png", "jpg"])
def test_writer_pool_size_never_changes_the_bytes(image_format, tiny_teacher_path, tmp_path):
    digests = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        generate(_config(tiny_teacher_path, out, image_format=image_format, write_workers=workers))
        assert verify_dataset(out) == []
        digests.append(_digests(out))
    assert digests[0] == digests[1] and len(digests[0]) == 3


def test_jpeg_logits_are_the_teachers_on_the_decoded_jpeg(tiny_teacher_path, tmp_path):
    """What a reader decodes is what the stored logits are for (JPEG is lossy: not the pixels before it)."""
    out = tmp_path / "jpg"
    generate(_config(tiny_teacher_path, out, image_format="jpg", write_batch_size=25))
    teacher = _teacher(tiny_teacher_path)
    samples = list(read_shard(out / "shard-000000.tar"))
    decoded = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        expected = teacher(teacher.input_spec.normalize(decoded.float() / 255)).half().numpy()
    stored = np.stack([s.logits for s in samples])
    assert np.array_equal(stored, expected)  # same batch as the writer's: bit for bit
    # and they differ from the logits of the same generator's PNG pixels (the bug this guards against)
    png = tmp_path / "png"
    generate(_config(tiny_teacher_path, png, image_format="png", write_batch_size=25))
    png_logits = np.stack([s.logits for s in read_shard(png / "shard-000000.tar")])
    assert not np.array_equal(png_logits, stored)


@pytest.mark.parametrize("image_format", ["png", "npy"])
def test_lossless_logits_are_the_teachers_on_the_stored_pixels_as_a_reader_batches_them(image_format,
                                                                                         tiny_teacher_path, tmp_path):
    """A reader that stacks decoded images and permutes them to (B, C, H, W) (distill's loader, a plain
    numpy or webdataset reader) gets the stored logits bit for bit, in the writer's batches and in others
    (a one-channel batch laid out otherwise rounds a float16 step differently in about 1 logit of 200)."""
    out = tmp_path / image_format
    generate(_config(tiny_teacher_path, out, image_format=image_format, num_images=600, shard_size=600,
                     write_batch_size=100))
    teacher = _teacher(tiny_teacher_path)
    samples = list(read_shard(out / "shard-000000.tar"))
    stored = np.stack([s.logits for s in samples])
    images = np.stack([s.image for s in samples])
    for batch in (100, 600, 7):
        with torch.no_grad():
            logits = np.concatenate([teacher(teacher.input_spec.normalize(
                torch.from_numpy(images[i:i + batch]).permute(0, 3, 1, 2).contiguous().float() / 255)).half().numpy()
                for i in range(0, len(images), batch)])
        assert np.array_equal(stored, logits), (batch, int((stored != logits).any(1).sum()))


# --------------------------------------------------------------------------- what a rerun must match
@pytest.mark.parametrize("change, differs", [({"write_batch_size": 10}, "--write-batch-size 16 there, 10 now"),
                                             ({"amp": "bf16"}, '--amp "none" there, "bf16" now'),
                                             ({"channels_last": True}, "--channels-last false there, true now")])
def test_byte_changing_options_are_in_the_config_hash(change, differs, tiny_teacher_path, tmp_path):
    out = tmp_path / "out"
    generate(_config(tiny_teacher_path, out, method="muse", method_options={"steps": "2", "width": "4",
                                                                            "latent_dim": "8", "scales": "1"}))
    with pytest.raises(UserError, match=re.escape(differs)):
        generate(_config(tiny_teacher_path, out, method="muse", method_options={"steps": "2", "width": "4",
                                                                                "latent_dim": "8", "scales": "1"},
                         **change))


def test_writer_count_and_threads_may_change_on_a_rerun(tiny_teacher_path, tmp_path):
    out = tmp_path / "out"
    first = generate(_config(tiny_teacher_path, out))
    (out / "shard-000001.tar").unlink()
    again = generate(_config(tiny_teacher_path, out, write_workers=2))
    assert again.shards == first.shards


def test_batch_size_changes_muse_bytes_so_it_must_be_hashed(tiny_teacher_path, tmp_path):
    """The reason for the rule above: MUSE's noisy embeddings draw per batch."""
    options = {"steps": "2", "width": "4", "latent_dim": "8", "scales": "1"}
    a = generate(_config(tiny_teacher_path, tmp_path / "a", method="muse", method_options=options, write_batch_size=25))
    b = generate(_config(tiny_teacher_path, tmp_path / "b", method="muse", method_options=options, write_batch_size=10))
    assert a.config_sha256 != b.config_sha256 and a.shards[0].sha256 != b.shards[0].sha256


# --------------------------------------------------------------------------- device and speed switches on the CPU
def test_device_cuda_without_a_gpu_is_a_one_line_error(tiny_teacher_path, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(synth_cli, ["generate", "--teacher", "lenet5", "--weights", str(tiny_teacher_path),
                                            "--out", str(tmp_path / "o"), "--device", "cuda", "--num-images", "10"])
    assert result.exit_code != 0 and "no CUDA GPU is available; use --device cpu" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


@pytest.mark.parametrize("method, options", [
    ("generator", TINY),
    ("muse", {"steps": "2", "width": "4", "latent_dim": "8", "teacher_input": "upsampled"}),
    ("deepinversion", {"iterations": "2", "flip": "false"}),
])
def test_bf16_and_channels_last_run_on_the_cpu(method, options, tiny_teacher_path, tmp_path):
    out = tmp_path / method
    m = generate(_config(tiny_teacher_path, out, method=method, method_options=options, num_images=30,
                         amp="bf16", channels_last=True, write_workers=1))
    assert m.complete and verify_dataset(out) == []
    assert m.config["compute"] == {"device": "cpu", "amp": "bf16", "channels_last": True, "compile": False}


@pytest.mark.parametrize("method, options", [("generator", {**TINY, "num_generators": "2", "steps": "2"}),
                                             ("deepinversion", {"iterations": "2"})])
def test_compile_traces_the_training_and_writing_steps(method, options, tiny_teacher_path, tmp_path, monkeypatch):
    """--compile on the CPU with torch.compile's aot_eager backend (traces as inductor does, no code
    generation): the BN hooks are traced, training and writing finish, and the shards verify."""
    monkeypatch.setenv("DFKD_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    out = tmp_path / method
    m = generate(_config(tiny_teacher_path, out, method=method, method_options=options, num_images=20,
                         shard_size=20, write_batch_size=10, compile=True))
    torch._dynamo.reset()
    eager = generate(_config(tiny_teacher_path, tmp_path / "eager", method=method, method_options=options,
                             num_images=20, shard_size=20, write_batch_size=10))
    assert m.complete and verify_dataset(out) == []
    a = np.stack([s.image for s in read_shard(out / "shard-000000.tar")]).astype(int)
    b = np.stack([s.image for s in read_shard(tmp_path / "eager" / "shard-000000.tar")]).astype(int)
    assert np.abs(a - b).mean() < 2  # the same images up to rounding of a few pixel levels


# --------------------------------------------------------------------------- on a GPU (skipped without CUDA)
@CUDA
def test_cuda_generate_verifies_and_a_rerun_keeps_finished_shards(tiny_teacher_path, tmp_path):
    out = tmp_path / "cuda"
    first = generate(_config(tiny_teacher_path, out, device="cuda", write_workers=2))
    assert verify_dataset(out) == [] and read_manifest(out).config["compute"]["device"] == "cuda"
    kept = (out / "shard-000000.tar").stat().st_mtime_ns
    (out / "shard-000001.tar").unlink()
    again = generate(_config(tiny_teacher_path, out, device="cuda", write_workers=2))
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept
    assert again.shards == first.shards  # the redone shard: the same bytes on the same GPU


@CUDA
def test_cuda_bf16_channels_last_all_methods(tiny_teacher_path, tmp_path):
    for method, options in (("generator", TINY), ("muse", {"steps": "2", "width": "4", "latent_dim": "8"}),
                            ("deepinversion", {"iterations": "2"})):
        out = tmp_path / method
        generate(_config(tiny_teacher_path, out, method=method, method_options=options, device="cuda",
                         amp="bf16", channels_last=True))
        assert verify_dataset(out) == []
