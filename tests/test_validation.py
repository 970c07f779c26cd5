"""The validation signal without real data: `distill train --val-shards` and `--keep best-val` on tiny
shards (random 28 px images labelled by a random LeNet-5 teacher), and `distill report`'s view of it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import dfkd.distill.evaluation as evaluation_module
import dfkd.distill.run_folder as run_folder_module
from dfkd.common.errors import UserError
from dfkd.common.fileio import load_torch_safely
from dfkd.common.models import create_model, load_model_checkpoint, save_model_checkpoint
from dfkd.common.shards import read_shard
from dfkd.distill.cli import main
from dfkd.distill.report import report_run
from dfkd.distill.train import train
from dfkd.distill.validation import BEST_VAL_FILE, best_epoch

from test_distill import config, read_metrics
from test_distill import write_shard_folder as write_folder  # the stage-two tests' tiny shard folders


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_teacher_path):
    root = tmp_path_factory.mktemp("validation")
    teacher = create_model("lenet5", weights=str(tiny_teacher_path)).eval()
    shards = write_folder(root / "shards", teacher, tiny_teacher_path)
    write_folder(shards / "val", teacher, tiny_teacher_path, shards=1, seed=1)  # as `synth generate` writes it
    plain = write_folder(root / "plain", teacher, tiny_teacher_path)             # no held-out split
    other_val = write_folder(root / "other_val", teacher, tiny_teacher_path, shards=1, seed=2)
    return {"root": root, "shards": shards, "plain": plain, "other_val": other_val, "teacher": teacher,
            "weights": tiny_teacher_path}


def by_hand(student_file: Path, val_folder: Path) -> tuple[float, float]:
    """Agreement (%) and mean KL(teacher || student) at T = 1 of a saved student on a shard folder, computed
    sample by sample from the shards."""
    student = create_model("lenet5_half", weights=str(student_file)).eval()
    agree, kl, n = 0, 0.0, 0
    for path in sorted(val_folder.glob("shard-*.tar")):
        for sample in read_shard(path):
            x = torch.from_numpy(sample.image.copy()).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                s = student(student.input_spec.normalize(x))[0].double()
            t = torch.from_numpy(sample.logits.astype(np.float64))
            p_t = t.softmax(0)
            kl += float((p_t * (t.log_softmax(0) - s.log_softmax(0))).sum())
            agree += int(s.argmax() == t.argmax())
            n += 1
    return 100.0 * agree / n, kl / n


# --------------------------------------------------------------------------- the columns
def test_auto_finds_the_val_split_and_logs_agreement_and_kl(data, tmp_path):
    metrics = train(config(data, tmp_path / "run"))
    rows = read_metrics(tmp_path / "run")
    assert list(rows[0]) == ["epoch", "step", "lr", "train_loss", "eval_top1", "seconds", "images_per_s",
                             "val_agreement", "val_kl", "loss_kd"]
    agreement, kl = by_hand(tmp_path / "run" / "student.pt", data["shards"] / "val")
    assert float(rows[-1]["val_agreement"]) == pytest.approx(agreement, abs=1e-6)
    assert float(rows[-1]["val_kl"]) == pytest.approx(kl, rel=1e-3, abs=1e-5)
    assert metrics["val_agreement"] == pytest.approx(agreement) and metrics["best_val_epoch"] is None
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["val_shards"] == str(data["shards"] / "val") and saved["keep"] == "last"
    assert not (tmp_path / "run" / BEST_VAL_FILE).exists()


def test_no_split_or_none_means_no_columns_and_an_explicit_one_is_used(data, tmp_path):
    for name, options in (("plain", {"shards": str(data["plain"])}), ("off", {"val_shards": "none"})):
        train(config(data, tmp_path / name, epochs=1, **options))
        assert "val_agreement" not in read_metrics(tmp_path / name)[0]
        assert json.loads((tmp_path / name / "config.json").read_text())["val_shards"] == "none"
    train(config(data, tmp_path / "explicit", epochs=1, shards=str(data["plain"]), val_shards=str(data["other_val"])))
    row = read_metrics(tmp_path / "explicit")[0]
    assert float(row["val_agreement"]) == pytest.approx(by_hand(tmp_path / "explicit" / "student.pt",
                                                                data["other_val"])[0])


def test_a_remote_val_split_is_streamed_and_measures_the_same(data, tmp_path):
    local = train(config(data, tmp_path / "local", epochs=1))
    remote = train(config(data, tmp_path / "remote", epochs=1, val_shards=f"pipe:cat {data['shards'] / 'val'}/{{name}}"))
    assert (remote["val_agreement"], remote["val_kl"]) == (local["val_agreement"], local["val_kl"])


def test_an_unfinished_val_split_is_left_out_with_a_note(data, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(data["shards"], shards)
    manifest = json.loads((shards / "val" / "manifest.json").read_text())
    manifest["complete"] = False
    (shards / "val" / "manifest.json").write_text(json.dumps(manifest))
    train(config(data, tmp_path / "run", epochs=1, shards=str(shards)))
    assert "val_agreement" not in read_metrics(tmp_path / "run")[0]
    assert "val is unfinished" in capsys.readouterr().err


# --------------------------------------------------------------------------- --keep best-val
def test_keep_best_val_keeps_the_epoch_the_signal_ranks_best(data, tmp_path, monkeypatch):
    """Scripted signals: epoch 3 and 4 tie on the lowest KL, epoch 3 has the higher agreement: epoch 3 is kept
    (not epoch 2, whose agreement is the highest), and student_best_val.pt holds exactly the weights measured
    at epoch 3."""
    script = iter([(50.0, 0.9), (90.0, 0.5), (80.0, 0.3), (70.0, 0.3)])
    weights = []

    def scripted(student, *args, **kwargs):
        weights.append({k: v.clone() for k, v in student.state_dict().items()})
        agreement, kl = next(script)
        return {"val_agreement": agreement, "val_kl": kl}

    monkeypatch.setattr(evaluation_module, "measure", scripted)
    metrics = train(config(data, tmp_path / "run", epochs=4, keep="best-val"))
    assert metrics["best_val_epoch"] == 3
    kept = load_torch_safely(tmp_path / "run" / BEST_VAL_FILE, "")
    assert kept["extra"]["epochs"] == 3 and kept["extra"]["val_agreement"] == 80.0 and kept["extra"]["val_kl"] == 0.3
    assert all(torch.equal(kept["state_dict"][k], weights[2][k]) for k in weights[2])
    assert not all(torch.equal(kept["state_dict"][k], weights[3][k]) for k in weights[3])
    final = load_model_checkpoint(tmp_path / "run" / "student.pt")["state_dict"]
    assert all(torch.equal(final[k], weights[3][k]) for k in weights[3])


def test_keep_best_val_matches_the_metrics_csv_ranking(data, tmp_path):
    metrics = train(config(data, tmp_path / "run", epochs=3, keep="best-val", lr=0.2))
    rows = [{k: float(v) for k, v in row.items() if v != ""} for row in read_metrics(tmp_path / "run")]
    best = min(rows, key=lambda r: (r["val_kl"], -r["val_agreement"], r["epoch"]))
    assert metrics["best_val_epoch"] == int(best["epoch"]) == best_epoch(rows)["epoch"]
    kept = load_torch_safely(tmp_path / "run" / BEST_VAL_FILE, "")
    assert kept["extra"]["epochs"] == int(best["epoch"])
    assert by_hand(tmp_path / "run" / BEST_VAL_FILE, data["shards"] / "val")[0] == pytest.approx(best["val_agreement"])
    report = report_run(tmp_path / "run")
    assert f"best-val epoch {int(best['epoch'])}: " in report.summary and BEST_VAL_FILE in report.summary
    assert list(report.table.columns[-3:]) == ["val_agreement", "val_kl", "loss_kd"] and report.image.is_file()


def test_resume_with_best_val_continues_the_ranking_and_refuses_another_split(data, tmp_path, killed_at_epoch):
    train(config(data, tmp_path / "straight", epochs=3, keep="best-val"))
    with killed_at_epoch(3):
        train(config(data, tmp_path / "resumed", epochs=3, keep="best-val"))
    with pytest.raises(UserError, match=r"ranked its epochs for --keep best-val on the held-out split .*shards/val, "
                                        r"not on .*other_val: resume with --val-shards"):
        train(config(data, tmp_path / "resumed", epochs=3, keep="best-val", resume=True,
                     val_shards=str(data["other_val"])))
    with pytest.raises(UserError, match=r"other settings \(keep 'best-val' -> 'last'\)"):
        train(config(data, tmp_path / "resumed", epochs=3, resume=True))
    train(config(data, tmp_path / "resumed", epochs=3, keep="best-val", resume=True))
    signal = [[(row["val_agreement"], row["val_kl"]) for row in read_metrics(tmp_path / run)]
              for run in ("straight", "resumed")]
    assert signal[0] == signal[1] and len(signal[0]) == 3
    straight, resumed = (load_torch_safely(tmp_path / run / BEST_VAL_FILE, "") for run in ("straight", "resumed"))
    assert straight["extra"]["epochs"] == resumed["extra"]["epochs"]
    assert all(torch.equal(straight["state_dict"][k], resumed["state_dict"][k]) for k in straight["state_dict"])


def test_a_kill_between_the_best_val_student_and_its_checkpoint_leaves_the_checkpoints_ranking(data, tmp_path,
                                                                                                 monkeypatch):
    """Epoch 3 ranks best, its student is written, and the run is killed before epoch 3's checkpoint. Redone
    on resuming, epoch 3 measures lower (a redo need not measure the same: speed options may change on
    resume): student_best_val.pt must be epoch 2's, as metrics.csv ranks it, not the killed attempt's."""
    script = iter([(50.0, 0.9), (80.0, 0.5), (90.0, 0.1), (60.0, 0.9)])
    monkeypatch.setattr(evaluation_module, "measure", lambda *a, **k: dict(zip(("val_agreement", "val_kl"), next(script))))
    saved = []

    def killed_after_the_third(name):
        if name == "best-val-saved":
            saved.append(name)
            if len(saved) == 3:
                raise KeyboardInterrupt   # stands in for SIGKILL: nothing after this point runs
    monkeypatch.setattr(run_folder_module, "fault_point", killed_after_the_third)
    with pytest.raises(KeyboardInterrupt):
        train(config(data, tmp_path / "run", epochs=3, keep="best-val"))
    train(config(data, tmp_path / "run", epochs=3, keep="best-val", resume=True))
    rows = [{k: float(v) for k, v in row.items() if v != ""} for row in read_metrics(tmp_path / "run")]
    assert [r["val_agreement"] for r in rows] == [50.0, 80.0, 60.0] and best_epoch(rows)["epoch"] == 2
    kept = load_torch_safely(tmp_path / "run" / BEST_VAL_FILE, "")
    assert kept["extra"]["epochs"] == 2 and kept["extra"]["val_agreement"] == 80.0
    assert not list((tmp_path / "run").glob("*.pending"))


def test_val_shards_may_change_on_resume_without_best_val(data, tmp_path, killed_at_epoch):
    with killed_at_epoch(2):
        train(config(data, tmp_path / "run", val_shards="none"))
    train(config(data, tmp_path / "run", resume=True, val_shards=str(data["other_val"])))
    rows = read_metrics(tmp_path / "run")
    # epoch 1 (run without a split) is measured when the run resumes, on the split given now
    assert all(row["val_agreement"] != "" for row in rows) and len(rows) == 2


# --------------------------------------------------------------------------- bad input
def test_bad_val_shards_are_one_line_errors(data, tmp_path):
    (tmp_path / "bare").mkdir()
    five = create_model("lenet5", num_classes=5).eval()
    save_model_checkpoint(tmp_path / "five.pt", five)
    five_classes = write_folder(tmp_path / "five", five, tmp_path / "five.pt", shards=1)
    torch.manual_seed(1)
    other = create_model("lenet5").eval()
    save_model_checkpoint(tmp_path / "other.pt", other)
    other_teacher = write_folder(tmp_path / "other", other, tmp_path / "other.pt", shards=1)
    real = write_folder(tmp_path / "real", data["teacher"], data["weights"], shards=1, method="real-mnist-train")
    damaged = tmp_path / "damaged"
    shutil.copytree(data["other_val"], damaged)
    (damaged / "shard-000000.tar").write_bytes(b"broken")
    cases = [
        ({"val_shards": str(tmp_path / "missing")}, r"--val-shards .*missing: shards folder .* does not exist"),
        ({"val_shards": str(tmp_path / "bare")}, r"--val-shards .*bare: .* has no manifest.json"),
        ({"val_shards": str(five_classes)}, r"does not fit the training shards \(it has 5 classes, the training "
                                            r"shards 10\); pass the val/ split"),
        ({"val_shards": str(other_teacher)}, r"labelled by another teacher"),
        ({"val_shards": str(real)}, r"holds real images \(real-mnist-train\)"),
        ({"val_shards": str(data["shards"])}, r"is the training shards"),
        ({"val_shards": str(damaged)}, r"1 shard\(s\) do not match its manifest .*synth verify"),
        ({"keep": "best-val", "val_shards": "none"}, r"--keep best-val ranks the epochs on a held-out synthetic "
                                                     r"split and there is none"),
        ({"keep": "best-val", "shards": str(data["plain"])}, r"there is none \(--val-shards auto\)"),
    ]
    for options, message in cases:
        with pytest.raises(UserError, match=message):
            train(config(data, tmp_path / "run", **options))
        assert not (tmp_path / "run").exists()  # refused before the run folder is made
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--shards", str(data["shards"]), "--student", "lenet5_half", "--out",
                                  str(tmp_path / "cli"), "--val-shards", str(five_classes)])
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("recipe: ")]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: --val-shards"), result.output
    result = runner.invoke(main, ["train", "--shards", str(data["shards"]), "--student", "lenet5_half", "--out",
                                  str(tmp_path / "cli"), "--keep", "best"])
    assert result.exit_code == 2 and "best-val" in result.output
    help_text = runner.invoke(main, ["train", "--help"]).output
    assert "--val-shards" in help_text and "--keep [last|best-val]" in help_text


# --------------------------------------------------------------------------- pipelines/val_signal.py
def test_val_signal_spearman_matches_scipy_and_reports_the_kept_epoch(tmp_path, capsys):
    import importlib.util

    stats = pytest.importorskip("scipy.stats")
    spec = importlib.util.spec_from_file_location("val_signal", Path(__file__).resolve().parents[1] / "pipelines"
                                                  / "val_signal.py")
    val_signal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(val_signal)

    rng = np.random.default_rng(3)
    runs = []
    for r in range(3):
        top1 = rng.uniform(80, 99, 8).round(1)
        top1[2] = top1[5]  # a tie
        frame = {"epoch": range(1, 9), "step": range(1, 9), "lr": 0.1, "train_loss": 1.0, "eval_top1": top1,
                 "seconds": 1.0, "images_per_s": 1.0, "val_agreement": (top1 + rng.normal(0, 3, 8)).round(0),
                 "val_kl": rng.uniform(0.1, 0.5, 8)}
        folder = tmp_path / f"run{r}"
        folder.mkdir()
        pd.DataFrame(frame).to_csv(folder / "metrics.csv", index=False)
        runs.append((folder, pd.DataFrame(frame)))
    table = val_signal.main([str(f) for f, _ in runs])
    for (folder, frame), row in zip(runs, table.to_dict("records")):
        assert row["rho_val_agreement"] == pytest.approx(stats.spearmanr(frame["val_agreement"], frame["eval_top1"])[0])
        assert row["rho_val_kl"] == pytest.approx(stats.spearmanr(-frame["val_kl"], frame["eval_top1"])[0])
        kept = frame.sort_values(["val_kl", "val_agreement", "epoch"], ascending=[True, False, True]).iloc[0]
        assert row["kept_epoch"] == kept["epoch"] and row["kept_minus_best"] == pytest.approx(
            kept["eval_top1"] - frame["eval_top1"].max())
    assert "across runs (final epochs): rho(val_agreement, eval_top1) = " in capsys.readouterr().out
    assert val_signal.spearman(pd.Series([1.0, 1.0, 1.0]), pd.Series([1.0, 2.0, 3.0])) is None
    # a run trained without --eval-data (an empty eval_top1 column) or without a split: a one-line error
    for empty in ("eval_top1", "val_kl"):
        frame = runs[0][1].copy()
        frame[empty] = None
        frame.to_csv(tmp_path / "empty.csv", index=False)
        with pytest.raises(SystemExit, match=f"lacks {empty}"):
            val_signal.main([str(tmp_path / "empty.csv")])


def test_val_signal_split_measures_each_final_student_on_one_common_split(data, tmp_path, capsys):
    """--split: runs trained without a held-out split (a benchmark's rows) are measured, final student by
    final student, on one shard folder; the numbers are the split's agreement and KL computed by hand."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("val_signal", Path(__file__).resolve().parents[1] / "pipelines"
                                                  / "val_signal.py")
    val_signal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(val_signal)
    runs = []
    for seed in (0, 1, 2):
        run = tmp_path / f"run{seed}"
        train(config(data, run, shards=str(data["plain"]), seed=seed, epochs=1))
        runs.append(run)
    table = val_signal.main([*map(str, runs), "--split", str(data["other_val"])])
    for run, row in zip(runs, table.to_dict("records")):
        agreement, kl = by_hand(run / "student.pt", data["other_val"])
        assert row["val_agreement"] == pytest.approx(agreement) and row["val_kl"] == pytest.approx(kl, rel=1e-3, abs=1e-5)
    assert "across runs (final students, one split)" in capsys.readouterr().out
