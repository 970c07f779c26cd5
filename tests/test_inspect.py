"""Inspection: `synth inspect` (contact sheet, class histogram, per-class table), `distill report` (curves)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from dfkd.common.errors import UserError
from dfkd.common.plots import PALETTE
from dfkd.common.shards import Sample, TeacherRecord, build_manifest, sample_key, write_manifest, write_shard
from dfkd.distill.cli import main as distill_cli
from dfkd.distill.report import report_run
from dfkd.synth.cli import main as synth_cli
from dfkd.synth.inspect import inspect_dataset

GREEN = (0, 200, 0)


def write_dataset(folder: Path) -> Path:
    """8 px RGB, 3 classes: class 0 six identical green images (collapse), class 1 twelve random ones,
    class 2 none. Logits: class 0 uniform (confidence 1/3), class 1 sure of class 1 for 9 of 12."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        samples.append(Sample(sample_key(i), np.full((8, 8, 3), GREEN, np.uint8), 0, np.zeros(3, np.float16)))
    for i in range(12):
        logits = np.array([0, 20, 0] if i < 9 else [20, 0, 0], np.float16)
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image[:, :, 1] = 0  # no pure green anywhere else
        samples.append(Sample(sample_key(6 + i), image, 1, logits))
    records = [write_shard(folder / "shard-000000.tar", samples[:9]), write_shard(folder / "shard-000001.tar",
                                                                                  samples[9:])]
    spec = {"channels": 3, "size": 8, "mean": [0.5] * 3, "std": [0.25] * 3, "num_classes": 3}
    teacher = TeacherRecord(arch="x", weights="none", weights_path=None, weights_sha256="a" * 64, input_spec=spec)
    write_manifest(folder, build_manifest(teacher, method="test", config={}, image_format="png", planned_samples=18,
                                          shard_size=9, shards=records, complete=True))
    return folder


def colour_count(image: Image.Image, colour: tuple[int, int, int]) -> int:
    pixels = np.asarray(image.convert("RGB"))
    return int((pixels == np.array(colour)).all(axis=2).sum())


def test_inspect_writes_sheet_histogram_and_table(tmp_path):
    folder = write_dataset(tmp_path / "shards")
    report = inspect_dataset(folder, tmp_path / "out", per_class=4)
    table = report.summary
    assert list(table.index) == [0, 1, 2, "all"]
    assert table.loc[0, "samples"] == 6 and table.loc[1, "samples"] == 12 and table.loc[2, "samples"] == 0
    assert table.loc[0, "exact_dups"] == 5 and table.loc[1, "exact_dups"] == 0  # the collapsed class
    assert table.loc[0, "pair_distance"] == 0 and table.loc[1, "pair_distance"] > 0.1
    assert table.loc[0, "confidence"] == pytest.approx(1 / 3) and table.loc[0, "entropy"] == pytest.approx(math.log(3))
    assert table.loc[1, "teacher_agrees_%"] == pytest.approx(75.0) and table.loc[1, "confidence"] == pytest.approx(1)
    assert table.loc["all", "samples"] == 18 and table.loc["all", "share_%"] == 100
    assert pd.read_csv(tmp_path / "out" / "summary.csv", index_col=0).loc["0", "exact_dups"] == 5

    sheet = Image.open(tmp_path / "out" / "contact_sheet.png")
    tile = 8 * 8  # 8 px images enlarged 8 times
    assert colour_count(sheet, GREEN) == 4 * tile * tile  # class 0's row: per_class tiles, pixels kept exact
    assert sheet.width > 4 * tile and sheet.height > 3 * tile

    histogram = np.asarray(Image.open(tmp_path / "out" / "class_histogram.png").convert("RGB"))
    heights = {}
    for colour_index, name in ((0, "label"), (1, "teacher")):
        mask = (histogram == np.array(PALETTE[colour_index])).all(axis=2)
        columns = mask.sum(axis=0)
        legend_rows = mask[:45].sum()  # the legend keys sit above the plot area
        heights[name] = sorted({int(h) for h in columns[columns > 20]}, reverse=True)
        assert legend_rows > 0
    # stored labels: 12 of class 1 vs 6 of class 0; teacher argmax: class 1 for 9, class 0 for 9 (6 uniform + 3)
    assert len(heights["label"]) == 2 and heights["label"][0] == pytest.approx(2 * heights["label"][1], abs=2)
    assert len(heights["teacher"]) == 1


def test_inspect_cli_prints_the_table_and_limit_reads_less(tmp_path):
    folder = write_dataset(tmp_path / "shards")
    result = CliRunner().invoke(synth_cli, ["inspect", str(folder), "--per-class", "3", "--limit", "9"])
    assert result.exit_code == 0, result.output
    assert "exact_dups" in result.output and "pair_distance" in result.output
    assert f"wrote {folder / 'inspect' / 'contact_sheet.png'}" in result.output
    table = pd.read_csv(folder / "inspect" / "summary.csv", index_col=0)
    assert table.loc["all", "samples"] == 9  # the first shard only


def test_inspect_skips_a_damaged_shard_says_how_much_and_exits_1_unless_told(tmp_path):
    folder = write_dataset(tmp_path / "shards")
    shard = folder / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    result = CliRunner().invoke(synth_cli, ["inspect", str(folder)])
    assert result.exit_code == 1 and "warning: skipped damaged shard shard-000001.tar" in result.stderr
    assert "skipped 1 of 2 shards (9 of 18 samples) that are damaged" in result.stderr
    assert "--skip-bad-shards" in result.stderr and (folder / "inspect" / "summary.csv").is_file()
    result = CliRunner().invoke(synth_cli, ["inspect", str(folder), "--skip-bad-shards"])
    assert result.exit_code == 0 and "skipped 1 of 2 shards (9 of 18 samples)" in result.stderr
    assert pd.read_csv(folder / "inspect" / "summary.csv", index_col=0).loc["all", "samples"] == 9
    result = CliRunner().invoke(synth_cli, ["inspect", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "does not exist" in result.output


def write_run(run: Path, with_eval: bool = True) -> Path:
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"student": "lenet5_half", "shards": "shards/x", "epochs": 3,
                                                 "eval_data": "mnist"}))
    pd.DataFrame({"epoch": [1, 2, 3], "step": [10, 20, 30], "lr": [0.1, 0.05, 0.0],
                  "train_loss": [1.5, 0.8, 0.6], "eval_top1": [90.0, 98.0, 97.5] if with_eval else [None] * 3,
                  "seconds": [60, 60, 60], "images_per_s": [100, 110, 120]}).to_csv(run / "metrics.csv", index=False)
    steps = np.arange(1, 31)
    pd.DataFrame({"epoch": (steps - 1) // 10 + 1, "step": steps, "lr": 0.1 * (1 - steps / 30),
                  "train_loss": 2.0 / np.sqrt(steps)}).to_csv(run / "steps.csv", index=False)
    return run


def test_report_draws_three_panels_and_prints_the_final_table(tmp_path):
    run = write_run(tmp_path / "run")
    result = CliRunner().invoke(distill_cli, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "final: epoch 3 of 3, train loss 0.6000, top-1 97.50% (best 98.00% at epoch 2), 3.0 min" in result.output
    assert result.output.count("\n") >= 5  # header + 3 epochs + summary + wrote
    image = Image.open(run / "curves.png")
    assert image.size == (3 * 420, 340 + 30)
    third = image.width // 3
    for panel in range(3):  # each panel has a line of the first colour
        assert colour_count(image.crop((panel * third, 0, (panel + 1) * third, image.height)), PALETTE[0]) > 50
    # the loss panel also has the per-epoch mean, in the second colour
    assert colour_count(image.crop((0, 0, third, image.height)), PALETTE[1]) > 20


def test_report_without_eval_data_or_step_log(tmp_path):
    run = write_run(tmp_path / "run", with_eval=False)
    (run / "steps.csv").unlink()
    report = report_run(run, tmp_path / "c.png")
    assert "top-1" not in report.summary and (tmp_path / "c.png").is_file()
    top1_panel = Image.open(tmp_path / "c.png").crop((420, 0, 840, 370))
    assert colour_count(top1_panel, PALETTE[0]) == 0  # "no data", no line


def test_report_out_takes_a_folder_as_export_does(tmp_path):
    """--out an existing folder, or a new name without an extension: FOLDER/curves.png; an extension no
    image type has: a one-line error."""
    run = write_run(tmp_path / "run")
    (tmp_path / "plots").mkdir()
    for out, image in ((tmp_path / "plots", tmp_path / "plots" / "curves.png"),
                       (tmp_path / "new" / "deploy", tmp_path / "new" / "deploy" / "curves.png")):
        result = CliRunner().invoke(distill_cli, ["report", str(run), "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert result.output.strip().splitlines()[-1] == f"wrote {image}"
        assert Image.open(image).size == (3 * 420, 370)
    result = CliRunner().invoke(distill_cli, ["report", str(run), "--out", str(tmp_path / "c.xyz")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "no image type has the extension .xyz; give a .png file, or a folder for curves.png" in result.output


def test_report_of_a_real_run(tmp_path, tiny_teacher_path):
    from dfkd.distill.train import TrainConfig, train
    from dfkd.synth.generate import GenerateConfig, generate

    generate(GenerateConfig(teacher="lenet5", weights=str(tiny_teacher_path), out=str(tmp_path / "noise"),
                            method="noise", num_images=64, shard_size=32, progress=False))
    train(TrainConfig(shards=str(tmp_path / "noise"), student="lenet5_half", out=str(tmp_path / "run"), epochs=2,
                      batch_size_per_rank=8, workers=0, progress=False))
    steps = pd.read_csv(tmp_path / "run" / "steps.csv")
    assert list(steps["step"]) == list(range(1, 17))  # 8 steps per epoch: one point per step here
    report = report_run(tmp_path / "run")
    assert report.summary.startswith("final: epoch 2 of 2, train loss") and len(report.table) == 2
    # synth wrote a held-out split (6 images) and training found it: agreement in the top-1 panel, a KL panel
    assert "val agreement " in report.summary and "best-val epoch " in report.summary
    assert Image.open(report.image).size == (4 * 420, 370)


@pytest.mark.parametrize("setup, message", [
    (lambda run: None, "does not exist"),
    (lambda run: run.mkdir(), "has no metrics.csv"),
    (lambda run: (run.mkdir(), (run / "metrics.csv").write_text("a,b\n1,2\n")), "lacks the columns"),
    (lambda run: (run.mkdir(), (run / "metrics.csv").write_text(
        "epoch,step,lr,train_loss,eval_top1,seconds,images_per_s\n1,x,0.1,1,,1,1\n")), "column step holds non-numbers"),
])
def test_report_bad_run_folders_are_one_line_errors(tmp_path, setup, message):
    run = tmp_path / "run"
    setup(run)
    result = CliRunner().invoke(distill_cli, ["report", str(run)])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
    with pytest.raises(UserError):
        report_run(run)


def test_charts_are_drawn_by_matplotlib_headless_and_only_import_it_when_drawing():
    """The packages and the CLIs import without matplotlib; a chart imports it and draws on its own Agg canvas:
    no pyplot, and a configured backend that cannot load (as on a machine without a display) does not matter."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import dfkd.common.plots, dfkd.distill, dfkd.distill.cli, dfkd.distill.report\n"
        "import dfkd.synth, dfkd.synth.cli, dfkd.synth.inspect\n"
        "assert 'matplotlib' not in sys.modules, 'imported at start'\n"
        "from dfkd.common.plots import Panel, bar_chart, line_panels\n"
        "bars = bar_chart(['0', '1'], {'a': [1, 2], 'b': [2, 1]}, 'class', 'samples', width=300, height=200)\n"
        "lines = line_panels([Panel('p', 'epoch', {'s': ([1, 2], [0.5, 0.25])})], panel_width=250, height=150)\n"
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules\n"
        "print(bars.size, lines.size)\n")
    env = dict(os.environ, MPLBACKEND="module://no_such_backend", OMP_NUM_THREADS="1")
    env.pop("DISPLAY", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["(300,", "200)", "(250,", "150)"]
