"""The DFKD papers' CIFAR architectures load the shared teacher bundle's checkpoints as they are: a file in the bundle's
format (its parameter names, written here from the peers' public model definitions, random values; weights under
`state_dict`, its own `arch` spelling and training extras) loads for each architecture, with the class count from the
file and the mean/std from its name; the no-flag commands run with such a teacher on stand-in CIFAR files."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dfkd.common.errors import UserError
from dfkd.common.input_spec import CIFAR_BUNDLE_STATS
from dfkd.common.models import PAPER_CIFAR, create_model, save_model_checkpoint


def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def peer_keys(arch: str, classes: int) -> dict:
    """name -> shape of the peers' state dict (Fast-Datafree / CMI `resnet.py`, `wresnet.py`, `vgg.py`)."""
    keys = {}
    if arch.startswith("cifar_resnet"):
        blocks = {"cifar_resnet18": (2, 2, 2, 2), "cifar_resnet34": (3, 4, 6, 3)}[arch]
        keys |= {"conv1.weight": (64, 3, 3, 3), **_bn("bn1", 64)}
        cin = 64
        for i, (w, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            for j in range(n):
                p = f"layer{i + 1}.{j}"
                keys |= {f"{p}.conv1.weight": (w, cin, 3, 3), **_bn(f"{p}.bn1", w), f"{p}.conv2.weight": (w, w, 3, 3),
                         **_bn(f"{p}.bn2", w)}
                if (i > 0 and j == 0) or cin != w:
                    keys |= {f"{p}.shortcut.0.weight": (w, cin, 1, 1), **_bn(f"{p}.shortcut.1", w)}
                cin = w
        keys |= {"linear.weight": (classes, 512), "linear.bias": (classes,)}
    elif arch.startswith("wrn_"):
        _, depth, k = arch.split("_")
        n, widths = (int(depth) - 4) // 6, (16, 16 * int(k), 32 * int(k), 64 * int(k))
        keys |= {"conv1.weight": (16, 3, 3, 3)}
        for s in range(3):
            for j in range(n):
                cin, cout, p = widths[s] if j == 0 else widths[s + 1], widths[s + 1], f"block{s + 1}.layer.{j}"
                keys |= {**_bn(f"{p}.bn1", cin), f"{p}.conv1.weight": (cout, cin, 3, 3), **_bn(f"{p}.bn2", cout),
                         f"{p}.conv2.weight": (cout, cout, 3, 3)}
                if cin != cout:
                    keys[f"{p}.convShortcut.weight"] = (cout, cin, 1, 1)
        keys |= {**_bn("bn1", widths[3]), "fc.weight": (classes, widths[3]), "fc.bias": (classes,)}
    else:
        cfg = {"cifar_vgg8": [[64], [128], [256], [512], [512]],
               "cifar_vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]]}[arch]
        cin = 3
        for b, widths in enumerate(cfg):
            for j, w in enumerate(widths):   # conv, BN, ReLU per conv; the block's last ReLU dropped
                keys |= {f"block{b}.{3 * j}.weight": (w, cin, 3, 3), f"block{b}.{3 * j}.bias": (w,),
                         **_bn(f"block{b}.{3 * j + 1}", w)}
                cin = w
        keys |= {"classifier.weight": (classes, 512), "classifier.bias": (classes,)}
    return keys


def bundle_file(folder: Path, dataset: str, arch: str, their_arch: str) -> tuple[Path, dict]:
    classes = 100 if dataset == "cifar100" else 10
    gen = torch.Generator().manual_seed(0)

    def value(key, shape):   # random, at the scale a trained network has (so that 40 layers stay finite)
        if key.endswith("num_batches_tracked"):
            return torch.tensor(7)
        if key.endswith("running_var"):
            return torch.rand(shape, generator=gen) + 0.5
        if len(shape) > 1:   # conv / linear weights: He scale
            return torch.randn(shape, generator=gen) * (2.0 / (torch.tensor(shape[1:]).prod().item())) ** 0.5
        return torch.randn(shape, generator=gen) * 0.1 + (1.0 if key.endswith("weight") else 0.0)

    state = {k: value(k, shape) for k, shape in peer_keys(arch, classes).items()}
    path = folder / f"{dataset}_{arch}.pth"
    torch.save({"epoch": 200, "arch": their_arch, "best_acc1": 94.7, "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "momentum": 0.9, "params": [0, 1]}]}}, path)
    return path, state


@pytest.mark.parametrize("arch", list(PAPER_CIFAR))
def test_a_bundle_checkpoint_loads_for_each_architecture(arch, tmp_path):
    dataset = "cifar100" if arch in ("wrn_40_2", "cifar_resnet34", "cifar_vgg8") else "cifar10"
    path, state = bundle_file(tmp_path, dataset, arch, PAPER_CIFAR[arch][0])
    model = create_model(arch, weights=str(path))
    classes = 100 if dataset == "cifar100" else 10
    assert model.input_spec.num_classes == classes and model.input_spec.size == 32
    assert (model.input_spec.mean, model.input_spec.std) == CIFAR_BUNDLE_STATS[classes]
    mine = model.state_dict()
    assert set(mine) == set(state) and all(torch.equal(mine[k], state[k]) for k in state)
    assert arch in model.weights_source or PAPER_CIFAR[arch][0] in model.weights_source
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, classes)


def test_the_spec_follows_the_file_and_mismatches_are_one_line_errors(tmp_path):
    path, state = bundle_file(tmp_path, "cifar100", "wrn_16_1", "wrn16_1")
    renamed = tmp_path / "teacher.pth"                          # no dataset prefix: the class count decides
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, renamed)   # DataParallel's prefix too
    model = create_model("wrn_16_1", weights=str(renamed))
    assert (model.input_spec.mean, model.input_spec.num_classes) == (CIFAR_BUNDLE_STATS[100][0], 100)
    assert "class count (100)" in model.weights_source
    with pytest.raises(UserError, match=r"holds a 'wrn16_1' \(here: wrn_16_1\), not a 'wrn_40_1': use --teacher wrn_16_1"):
        create_model("wrn_40_1", weights=str(path))
    with pytest.raises(UserError, match="has 100 classes .*fc.weight"):
        create_model("wrn_16_1", weights=str(path), num_classes=10)


def test_a_cifar_resnet_checkpoint_of_torchvision_names_still_loads(tmp_path):
    """cifar_resnet18 checkpoints saved when it was a torchvision ResNet (downsample.*, fc.*) load renamed."""
    model = create_model("cifar_resnet18", num_classes=10)
    old = {k.replace(".shortcut.", ".downsample.").replace("linear.", "fc."): v for k, v in model.state_dict().items()}
    path = tmp_path / "old.pt"
    save_model_checkpoint(path, model)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = old
    torch.save(payload, path)
    again = create_model("cifar_resnet18", weights=str(path))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    assert not hasattr(again, "weights_source")   # our own checkpoint: its recorded spec, no bundle source


def test_the_no_flag_commands_run_with_a_bundle_teacher_on_standin_cifar(tmp_path, monkeypatch, load_pipeline):
    """`synth generate --teacher wrn_40_2 --weights cifar10_wrn_40_2.pth` and `distill train --student wrn_16_2`
    with nothing else but tiny sizes: the cifar10 recipe is chosen, the manifest names the source, the student is
    evaluated on (stand-in) CIFAR-10."""
    from dfkd.distill.cli import main as distill_main
    from dfkd.synth.cli import main as synth_main

    load_pipeline("bench_cifar").write_standin_cifar(tmp_path / "data", 10, n=8)
    weights, _ = bundle_file(tmp_path, "cifar10", "wrn_40_2", "wrn40_2")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(synth_main, ["generate", "--teacher", "wrn_40_2", "--weights", weights.name,
                                             "--out", "shards", "--num-images", "16", "--shard-size", "16",
                                             "--write-batch-size", "16", "--set", "num_generators=1", "--set",
                                             "steps=1", "--set", "train_batch_size=4", "--val-images", "0"])
    assert result.exit_code == 0, result.output
    assert "recipe: cifar10 (auto:" in result.output and "not measured on CIFAR" in result.output
    teacher = json.loads((tmp_path / "shards" / "manifest.json").read_text())["teacher"]
    assert "cifar10_wrn_40_2.pth" in teacher["source"] and "arch 'wrn40_2'" in teacher["source"]
    assert teacher["input_spec"]["std"] == list(CIFAR_BUNDLE_STATS[10][1])
    result = CliRunner().invoke(distill_main, ["train", "--shards", "shards", "--student", "wrn_16_2", "--out", "run",
                                               "--epochs", "1", "--batch-size-per-rank", "8", "--workers", "0",
                                               "--eval-data", "cifar10", "--data-root", "data"])
    assert result.exit_code == 0, result.output
    assert "recipe: cifar10" in result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["aug"] == "crop-flip" and config["batch_size_per_rank"] == 8
