"""Stage one: the generator-ensemble method, restartable and deterministic shard writing, CLI errors."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dfkd.common.errors import UserError
from dfkd.common.shards import read_manifest, read_shard, verify_dataset
from dfkd.synth.cli import main as synth_cli
from dfkd.synth.generate import GenerateConfig, generate

TINY = {"num_generators": "2", "steps": "6", "train_batch_size": "20", "width": "4", "latent_dim": "8",
        "feature_diversity_weight": "0.5", "sample_noise_scale": "1.5",
        "checkpoint_every": "2"}


def _config(teacher, out, **kw):
    base = dict(teacher="lenet5", weights=str(teacher), out=str(out), method_options=dict(TINY),
                num_images=50, shard_size=20, write_batch_size=16, progress=False)
    base.update(kw)
    return GenerateConfig(**base)


def _shard_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("shard-*.tar"))}


def test_generate_writes_valid_balanced_shards(tiny_teacher_path, tmp_path):
    m = generate(_config(tiny_teacher_path, tmp_path / "out"))
    assert m.complete and [s.num_samples for s in m.shards] == [20, 20, 10]
    assert verify_dataset(tmp_path / "out") == []
    samples = [s for p in sorted((tmp_path / "out").glob("shard-*.tar")) for s in read_shard(p)]
    assert [s.key for s in samples] == [f"sample-{i:08d}" for i in range(50)]
    assert sorted(s.label for s in samples) == sorted(i % 10 for i in range(50))
    assert {s.meta["stream"] for s in samples} == {0, 1}
    assert samples[0].image.shape == (28, 28, 1) and samples[0].logits.shape == (10,)
    # stored logits are the teacher's on exactly the stored 8-bit image
    from dfkd.common.models import create_model
    teacher = create_model("lenet5", weights=str(tiny_teacher_path)).eval()
    x = torch.from_numpy(samples[3].image.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = teacher(teacher.input_spec.normalize(x))[0].half()
    assert torch.allclose(torch.tensor(samples[3].logits).float(), expected.float(), atol=1e-2)
    assert json.loads((tmp_path / "out" / "_info.json").read_text())["num_samples"] == 50


def test_same_seed_same_bytes_and_resume_redoes_only_unfinished(tiny_teacher_path, tmp_path):
    generate(_config(tiny_teacher_path, tmp_path / "a"))
    reference = _shard_bytes(tmp_path / "a")
    generate(_config(tiny_teacher_path, tmp_path / "b"))
    assert _shard_bytes(tmp_path / "b") == reference
    # simulate a kill after the first shard: drop later shards from disk and manifest, damage one
    b = tmp_path / "b"
    m = read_manifest(b)
    (b / "shard-000002.tar").unlink()
    (b / "shard-000001.tar").write_bytes(b"half a shard")
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["complete"] = False
    manifest["shards"] = manifest["shards"][:2]
    (b / "manifest.json").write_text(json.dumps(manifest))
    mtime0 = (b / "shard-000000.tar").stat().st_mtime_ns
    generate(_config(tiny_teacher_path, b))
    assert _shard_bytes(b) == reference
    assert (b / "shard-000000.tar").stat().st_mtime_ns == mtime0  # finished shard kept, not rewritten
    assert read_manifest(b).shards == m.shards


def test_refuses_to_mix_configs_and_overwrite_starts_over(tiny_teacher_path, tmp_path):
    generate(_config(tiny_teacher_path, tmp_path / "o"))
    with pytest.raises(UserError, match="other settings.*--seed 0 there, 1 now"):
        generate(_config(tiny_teacher_path, tmp_path / "o", seed=1))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        generate(_config(tiny_teacher_path, tmp_path / "x"))
    m = generate(_config(tiny_teacher_path, tmp_path / "o", seed=1, overwrite=True))
    assert m.config["seed"] == 1 and verify_dataset(tmp_path / "o") == []


def test_refusal_lists_only_the_settings_that_differ(tiny_teacher_path, tmp_path):
    """The manifest's config went through JSON (tuples are lists there): input_spec must not show up as
    differing when only the seed does."""
    generate(_config(tiny_teacher_path, tmp_path / "o"))
    with pytest.raises(UserError, match=r"other settings \(--seed 0 there, 1 now\)") as refused:
        generate(_config(tiny_teacher_path, tmp_path / "o", seed=1))
    assert "input_spec" not in refused.value.message


def test_random_weight_torchvision_teacher_smoke(tmp_path):
    m = generate(GenerateConfig(teacher="resnet18", weights="none", out=str(tmp_path / "r"), num_images=4,
                                shard_size=4, resolution=32, write_batch_size=4, progress=False,
                                method_options={"num_generators": "1", "steps": "1", "train_batch_size": "4",
                                                "width": "4", "latent_dim": "4"}))
    assert m.num_samples == 4 and m.input_spec.size == 32 and m.num_classes == 1000


@pytest.mark.parametrize("args, message", [
    (["--teacher", "nonet", "--weights", "none"], "unknown model 'nonet'"),
    (["--teacher", "lenet5", "--weights", "missing.pt"], "does not exist"),
    (["--teacher", "lenet5", "--weights", "none", "--set", "bogus=1"], "unknown option 'bogus'"),
    (["--teacher", "lenet5", "--weights", "none", "--set", "steps=many"], "expects an integer"),
    (["--teacher", "lenet5", "--weights", "none", "--num-images", "0"], "at least 1"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, args, message):
    result = CliRunner().invoke(synth_cli, ["generate", "--out", str(tmp_path / "o"), "--quiet", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_cli_generate_and_verify(tiny_teacher_path, tmp_path):
    out = tmp_path / "c"
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    r = CliRunner().invoke(synth_cli, ["generate", "--teacher", "lenet5", "--weights", str(tiny_teacher_path),
                                       "--out", str(out), "--num-images", "30", "--shard-size", "10", "--quiet",
                                       *sets])
    assert r.exit_code == 0, r.output
    assert "wrote 30 images in 3 shards" in r.output
    r = CliRunner().invoke(synth_cli, ["verify", str(out)])
    assert r.exit_code == 0 and "OK   3 shards, 30 samples, all decoded" in r.output
    (out / "shard-000001.tar").write_bytes(b"broken")
    r = CliRunner().invoke(synth_cli, ["verify", str(out)])
    assert r.exit_code == 1 and "BAD  shard-000001.tar: 6 bytes, the manifest says" in r.output


def test_generator_steps_auto_scale_with_dataset_size():
    from dfkd.synth.methods.generator import GeneratorEnsembleConfig

    auto = GeneratorEnsembleConfig(train_batch_size=100)
    assert auto.for_images(64).steps == 20          # smoke runs stay short
    assert auto.for_images(50_000).steps == 1000
    assert auto.for_images(10_000_000).steps == 2000
    assert GeneratorEnsembleConfig(steps=7).for_images(10**6).steps == 7  # explicit wins


# --------------------------------------------------------------------------- held-out split
def _images(folder):
    return {s.key: s for p in sorted(Path(folder).glob("shard-*.tar")) for s in read_shard(p)}


def test_held_out_split_is_its_own_dataset_and_leaves_the_training_shards_alone(tiny_teacher_path, tmp_path):
    m = generate(_config(tiny_teacher_path, tmp_path / "v", val_images=25))
    generate(_config(tiny_teacher_path, tmp_path / "plain", val_images=0))
    assert not (tmp_path / "plain" / "val").exists()
    assert _shard_bytes(tmp_path / "v") == _shard_bytes(tmp_path / "plain")  # training shards: the same bytes
    assert m.config_sha256 == read_manifest(tmp_path / "plain").config_sha256
    # the training manifest does not depend on the split either (the split's own manifest records its size)
    def without_folder(path):
        return (path / "manifest.json").read_text().replace(str(path), "<out>")
    assert without_folder(tmp_path / "v") == without_folder(tmp_path / "plain")
    val = read_manifest(tmp_path / "v" / "val")
    assert val.complete and [s.num_samples for s in val.shards] == [20, 5]
    assert val.config["split"] == "val" and val.config["val_images"] == 25
    assert val.teacher == read_manifest(tmp_path / "v").teacher and val.num_classes == m.num_classes
    assert verify_dataset(tmp_path / "v") == [] and verify_dataset(tmp_path / "v" / "val") == []
    held_out, train = _images(tmp_path / "v" / "val"), _images(tmp_path / "v")
    assert sorted(s.label for s in held_out.values()) == sorted(i % 10 for i in range(25))
    assert {s.meta["split"] for s in held_out.values()} == {"val"} and {s.meta["stream"] for s in held_out.values()} == {0, 1}
    trained = {s.image.tobytes() for s in train.values()}
    assert not any(s.image.tobytes() in trained for s in held_out.values())  # other seeds: no image shared
    assert json.loads((tmp_path / "v" / "val" / "_info.json").read_text())["num_samples"] == 25


def test_held_out_split_resumes_and_refuses_another_size(tiny_teacher_path, tmp_path):
    out = tmp_path / "v"
    generate(_config(tiny_teacher_path, out, val_images=25))
    reference = _shard_bytes(out / "val")
    val = out / "val"
    (val / "shard-000001.tar").unlink()  # a kill while writing the held-out split's second shard
    manifest = json.loads((val / "manifest.json").read_text())
    manifest["complete"], manifest["shards"] = False, manifest["shards"][:1]
    (val / "manifest.json").write_text(json.dumps(manifest))
    mtime0 = (val / "shard-000000.tar").stat().st_mtime_ns
    generate(_config(tiny_teacher_path, out, val_images=25))
    assert _shard_bytes(val) == reference and (val / "shard-000000.tar").stat().st_mtime_ns == mtime0
    with pytest.raises(UserError, match=r"held-out split made with other settings \(--val-images 25 there, 10 "
                                        r"now\); rerun with the same flags, or delete .*val to write it anew"):
        generate(_config(tiny_teacher_path, out, val_images=10))
    import shutil
    shutil.rmtree(val)
    generate(_config(tiny_teacher_path, out, val_images=10))
    assert read_manifest(val).num_samples == 10
    generate(_config(tiny_teacher_path, out, seed=1, overwrite=True, val_images=0))
    assert not val.exists()  # --overwrite clears the held-out split too


def test_verify_checks_the_held_out_split(tiny_teacher_path, tmp_path):
    out = tmp_path / "v"
    generate(_config(tiny_teacher_path, out, val_images=25))
    r = CliRunner().invoke(synth_cli, ["verify", str(out)])
    assert r.exit_code == 0 and "all decoded; held-out split val/: 2 shards, 25 samples" in r.output
    (out / "val" / "shard-000001.tar").write_bytes(b"broken")
    r = CliRunner().invoke(synth_cli, ["verify", str(out)])
    assert r.exit_code == 1 and "BAD  val/shard-000001.tar: 6 bytes, the manifest says" in r.output
    manifest = json.loads((out / "val" / "manifest.json").read_text())
    manifest["teacher"]["weights_sha256"] = "0" * 64
    (out / "val" / "manifest.json").write_text(json.dumps(manifest))
    assert any(p.startswith("val/manifest.json: it was labelled by another teacher") for p in verify_dataset(out))


def test_held_out_split_default_size():
    from dfkd.synth.generate import val_count

    sizes = {n: val_count(GenerateConfig(teacher="lenet5", num_images=n)) for n in (50, 10_000, 96_000, 10**6)}
    assert sizes == {50: 5, 10_000: 500, 96_000: 1920, 10**6: 2000}
    assert val_count(GenerateConfig(teacher="lenet5", num_images=10**6, val_images=0)) == 0
