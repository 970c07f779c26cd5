"""Models from timm (`timm/<name>`) and from the user's own code (`module:callable`): input specs from their
metadata or from options, checkpoints that round-trip, and both ends of the pipeline (synth -> distill)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dfkd.common.errors import UserError
from dfkd.common.models import create_model, load_model_checkpoint, save_model_checkpoint, state_dict_sha256

pytest.importorskip("timm")

TINY = {"num_generators": "1", "steps": "2", "train_batch_size": "10", "width": "4", "latent_dim": "8"}

USER_MODULE = '''
import torch.nn as nn


class Tiny(nn.Module):
    input_spec = {"size": 16, "mean": (0.5,), "std": (0.25,)}

    def __init__(self, num_classes=10, in_chans=1, norm=True):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, 4, 3, padding=1), nn.BatchNorm2d(4) if norm else nn.Identity(),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def build(num_classes=10, in_chans=1):
    return Tiny(num_classes, in_chans)


def build_without_bn(num_classes=10, in_chans=1):
    return Tiny(num_classes, in_chans, norm=False)


def plain():  # no metadata, no arguments: size and classes come from the options / a forward pass
    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 7))
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "my_nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_timm_model_takes_its_spec_from_pretrained_cfg(tmp_path):
    model = create_model("timm/test_resnet", num_classes=10)
    spec = model.input_spec
    assert (spec.channels, spec.size, spec.num_classes) == (3, 160, 10)
    assert spec.mean == (0.5, 0.5, 0.5) and model.arch == "timm/test_resnet"
    small = create_model("timm/test_resnet", num_classes=10, in_chans=1, input_size=32)
    assert small.input_spec.channels == 1 and small.input_spec.size == 32 and small.input_spec.mean == (0.5,)
    assert small(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    save_model_checkpoint(tmp_path / "t.pt", small)
    again = create_model("timm/test_resnet", weights=str(tmp_path / "t.pt"))
    assert state_dict_sha256(again) == state_dict_sha256(small) and again.input_spec == small.input_spec


def test_timm_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="timm has no model"):
        create_model("timm/no_such_net_xyz")
    with pytest.raises(UserError, match="use DEFAULT"):
        create_model("timm/test_resnet", weights="IMAGENET1K_V1")
    save_model_checkpoint(tmp_path / "t.pt", create_model("timm/test_resnet", num_classes=10))
    with pytest.raises(UserError, match="holds a 'timm/test_resnet'"):
        create_model("timm/test_efficientnet", weights=str(tmp_path / "t.pt"))


def test_timm_pretrained_offline_is_a_one_line_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "dfkd.synth", "generate", "--teacher", "timm/resnet50.a1_in1k",
                           "--weights", "DEFAULT", "--out", str(tmp_path / "s")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: could not get timm's pretrained weights"), proc.stderr
    assert "Hugging Face hub cache" in lines[0]


def test_user_module_model_spec_weights_and_round_trip(user_module, tmp_path):
    model = create_model("my_nets:build", num_classes=5)
    spec = model.input_spec
    assert (spec.channels, spec.size, spec.num_classes, spec.mean, spec.std) == (1, 16, 5, (0.5,), (0.25,))
    save_model_checkpoint(tmp_path / "u.pt", model)
    assert load_model_checkpoint(tmp_path / "u.pt")["arch"] == "my_nets:build"
    again = create_model("my_nets:build", weights=str(tmp_path / "u.pt"))
    assert state_dict_sha256(again) == state_dict_sha256(model) and again.input_spec == spec
    plain = create_model("my_nets:plain", input_size=12)
    assert (plain.input_spec.size, plain.input_spec.num_classes, plain.input_spec.channels) == (12, 7, 3)
    with pytest.raises(UserError, match="--resolution"):
        create_model("my_nets:plain")
    with pytest.raises(UserError, match="no weights to download"):
        create_model("my_nets:build", weights="DEFAULT")
    with pytest.raises(UserError, match="cannot import 'not_a_module_xyz'"):
        create_model("not_a_module_xyz:build")
    with pytest.raises(UserError, match="no callable 'nope'"):
        create_model("my_nets:nope")


def test_teacher_without_batchnorm_is_refused_by_bn_methods(user_module, tmp_path):
    from dfkd.synth.generate import GenerateConfig, generate

    config = GenerateConfig(teacher="my_nets:build_without_bn", weights="none", out=str(tmp_path / "s"),
                            method_options=dict(TINY), num_images=20, shard_size=10, write_batch_size=10, progress=False)
    with pytest.raises(UserError, match="no BatchNorm layers.*--method noise"):
        generate(config)
    noise = generate(GenerateConfig(teacher="my_nets:build_without_bn", weights="none", out=str(tmp_path / "n"),
                                    method="noise", num_images=20, shard_size=10, write_batch_size=10, progress=False))
    assert noise.num_samples == 20


def test_timm_teacher_to_user_student_end_to_end(user_module, tmp_path):
    """synth generate with a tiny timm teacher (random weights) -> distill train of a student from the user's
    module and of a timm student -> their checkpoints rebuild the same models -> distill export of both."""
    from dfkd.distill.export import export_run
    from dfkd.distill.train import TrainConfig, train
    from dfkd.synth.generate import GenerateConfig, generate

    manifest = generate(GenerateConfig(teacher="timm/test_resnet", weights="none", out=str(tmp_path / "s"),
                                       method_options=dict(TINY), num_images=40, shard_size=20, write_batch_size=20,
                                       resolution=16, num_classes=4, progress=False))
    assert manifest.teacher["arch"] == "timm/test_resnet" and manifest.input_spec.size == 16
    metrics = train(TrainConfig(shards=str(tmp_path / "s"), student="my_nets:build", out=str(tmp_path / "run"),
                                epochs=1, batch_size_per_rank=10, workers=0, progress=False))
    assert metrics["steps"] == 4
    student = load_model_checkpoint(tmp_path / "run" / "student.pt")
    assert student["arch"] == "my_nets:build" and student["input_spec"]["channels"] == 3
    rebuilt = create_model("my_nets:build", weights=str(tmp_path / "run" / "student.pt"))
    assert rebuilt.input_spec.num_classes == 4 and rebuilt.input_spec.size == 16
    exported = export_run(tmp_path / "run", formats=("export", "torchscript"))
    assert set(exported.max_abs_diff) == {"export", "torchscript"}
    train(TrainConfig(shards=str(tmp_path / "s"), student="timm/test_resnet", out=str(tmp_path / "timm-run"),
                      epochs=1, batch_size_per_rank=10, workers=0, progress=False))
    exported = export_run(tmp_path / "timm-run", formats=("export",))
    spec = json.loads(exported.spec_file.read_text())
    assert spec["arch"] == "timm/test_resnet" and spec["input_spec"]["mean"] == [0.5, 0.5, 0.5]
