"""`distill export`: the student (or its EMA) as torch.export and TorchScript files that load without our code,
outputs checked against the trained model, the input spec in student.json."""
import json

import pytest
import torch
from click.testing import CliRunner

from dfkd.common.errors import UserError
from dfkd.common.models import create_model
from dfkd.distill.cli import main
from dfkd.distill.export import export_run, onnx_available
from dfkd.distill.train import TrainConfig, train
from dfkd.synth.generate import GenerateConfig, generate


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_teacher_path):
    root = tmp_path_factory.mktemp("export")
    generate(GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path), out=str(root / "shards"),
                            method="noise", num_images=40, shard_size=20, write_batch_size=20, progress=False))
    train(TrainConfig(shards=str(root / "shards"), student="lenet5_half", out=str(root / "run"), epochs=1,
                      batch_size_per_rank=10, workers=0, ema_decay=0.9, progress=False))
    return root / "run"


def test_export_writes_checked_files_and_the_input_spec(run, tmp_path):
    result = export_run(run, tmp_path / "out")
    assert set(result.files) >= {"export", "torchscript"} and ("onnx" in result.files) == onnx_available()
    assert all(diff <= 1e-4 for diff in result.max_abs_diff.values())
    doc = json.loads(result.spec_file.read_text())
    assert doc["arch"] == "lenet5_half" and doc["input_spec"]["size"] == 28 and doc["input_spec"]["channels"] == 1
    assert doc["input_spec"]["num_classes"] == 10 and doc["input_spec"]["mean"] == [0.1307]
    assert doc["check"]["source"].startswith("the first 8 images of")
    trained = create_model("lenet5_half", weights=str(run / "student.pt")).eval()
    x = torch.randn(5, 1, 28, 28)  # another batch size than the check batch: the batch dimension is dynamic
    with torch.no_grad():
        want = trained(x)
        assert torch.allclose(torch.export.load(str(result.files["export"])).module()(x), want, atol=1e-4)
        assert torch.allclose(torch.jit.load(str(result.files["torchscript"]))(x), want, atol=1e-4)


def test_export_of_the_ema_and_errors(run, tmp_path):
    result = export_run(run, tmp_path / "ema", formats=("export",), ema=True)
    assert list(result.files) == ["export"] and json.loads(result.spec_file.read_text())["ema"] is True
    with pytest.raises(UserError, match="does not exist"):
        export_run(tmp_path / "no-run")
    if not onnx_available():
        with pytest.raises(UserError, match="pip install"):
            export_run(run, tmp_path / "onnx", formats=("onnx",))


def test_export_cli(run, tmp_path):
    result = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "cli"), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    assert "student.torchscript.pt (max logit difference" in result.output and (tmp_path / "cli" / "student.json").is_file()
