"""The stopping rule on the held-out KL (`distill train --stop-patience`, distill/stopping.py): the decision on a
scripted history, the cool-down in the per-step schedule and in the checkpoint, a run that stops early and
what it records, bit-identical students without the rule and across kills, the refusals, and the benchmark's
view of a run that stopped. Tiny shards (random 28 px images labelled by a random LeNet-5 teacher) with a
held-out val/ split, as test_validation.py makes them."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import dfkd.distill.evaluation as evaluation_module
from dfkd.common.errors import UserError
from dfkd.common.models import create_model
from dfkd.distill.cli import main
from dfkd.distill.engine import WarmupCosine, cool_down, warmup_cosine
from dfkd.distill.report import report_run
from dfkd.distill.stopping import COOL_DOWN, TRAIN, StopRule, recorded_trigger, run_end
from dfkd.distill.train import train

from test_distill import PER_SHARD, SHARDS, config, read_metrics
from test_distill import write_shard_folder as write_folder
from test_faults import KILLED, assert_same_student, run_forked

STEPS = SHARDS * PER_SHARD // 16   # per epoch, at the tests' batch of 16
# every epoch's held-out KL "has not fallen": the rule triggers as soon as it may
ALWAYS = dict(stop_patience=1, stop_min_delta=1.0, stop_cooldown=1.0, epochs=6)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_teacher_path):
    root = tmp_path_factory.mktemp("stopping")
    teacher = create_model("lenet5", weights=str(tiny_teacher_path)).eval()
    shards = write_folder(root / "shards", teacher, tiny_teacher_path)
    write_folder(shards / "val", teacher, tiny_teacher_path, shards=1, seed=1)  # as `synth generate` writes it
    plain = write_folder(root / "plain", teacher, tiny_teacher_path)             # no held-out split
    other_val = write_folder(root / "other_val", teacher, tiny_teacher_path, shards=1, seed=2)
    return {"root": root, "shards": shards, "plain": plain, "other_val": other_val}


def students_equal(a: Path, b: Path) -> bool:
    x, y = (torch.load(p / "student.pt", weights_only=True)["state_dict"] for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def read_steps(run: Path) -> list[dict]:
    with open(run / "steps.csv") as f:
        return list(csv.DictReader(f))


def scripted_kl(monkeypatch, values) -> None:
    """The held-out split measures `values` (val_kl) epoch after epoch, whatever the student."""
    script = iter(values)
    monkeypatch.setattr(evaluation_module, "measure", lambda *a, **k: {"val_agreement": 50.0, "val_kl": next(script)})


# --------------------------------------------------------------------------- the decision
def test_the_rule_triggers_where_the_kl_stops_falling_by_min_delta():
    rule = StopRule(patience=2, min_delta=0.05, cooldown=0.2, cap=20)
    kl = [1.0, 0.8, 0.79, 0.78, 0.5]
    # epoch 3: 0.79 is more than 5% below epoch 1's 1.0; epoch 4: neither 0.79 nor 0.78 is 5% below epoch 2's 0.8
    assert rule.check(kl, 3) is None
    trigger = rule.decide({"val_kl": v} for v in kl)
    assert (trigger.epoch, trigger.best, trigger.best_epoch, trigger.kl, trigger.cooldown, trigger.end) == (
        4, 0.8, 2, 0.78, 1, 5)
    assert trigger.describe() == ("epoch 4: held-out KL 0.78 has not fallen 5% below 0.8 (epoch 2) in 2 epochs; the "
                                  "learning rate anneals to 0 over 1 epoch, the run ends at epoch 5 of at most 20")
    assert StopRule(2, 0.01, 0.2, 20).decide({"val_kl": v} for v in kl) is None        # 0.78 < 0.99 x 0.8
    assert StopRule(2, 0.05, 0.2, 20, warmup_epochs=4.5).decide({"val_kl": v} for v in kl) is None  # in the warm-up
    assert StopRule(2, 0.05, 0.2, 4).decide({"val_kl": v} for v in kl[:4]) is None      # at the cap: nothing left
    assert StopRule(2, 0.05, 0.2, 5).check(kl, 4).cooldown == 1                         # at most what is left
    assert StopRule(1, 0.05, 0.5, 20).check([1.0, 1.0] + [1.0] * 8, 10).cooldown == 5   # round(0.5 x 10)
    # it needs patience + 1 measured epochs: an unmeasured epoch in the window decides nothing
    assert rule.decide({"val_kl": v} for v in [1.0, 1.0]) is None
    assert rule.check([1.0, None, 1.0], 3) is None and rule.check([None, 1.0, 1.0], 3) is None
    assert rule.check([1.0, 1.0, 1.0], 3).epoch == 3


def test_run_end_says_why_a_run_ended():
    rule = StopRule(2, 0.05, 0.2, 20)
    assert run_end(7, 20, rule, 6) == "stopped early by the held-out KL at epoch 7 of at most 20 (trigger at epoch 6)"
    assert run_end(6, 20, rule, 6).startswith("in its cool-down since epoch 6")
    assert run_end(20, 20, rule, None) == "reached the cap of 20 epochs"
    assert run_end(10, 10, None, None) == "ran the fixed 10 epochs"
    assert run_end(3, 10, None, None) is None
    assert recorded_trigger([{"epoch": 1, "phase": TRAIN}, {"epoch": 2, "phase": COOL_DOWN}]) == 1


# --------------------------------------------------------------------------- the schedule
def _old_warmup_cosine(total_steps: int, warmup_steps: int):
    """The factor of the schedule before the cool-down existed (a plain function), to compare against."""
    warmup_steps = min(warmup_steps, total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def test_the_cool_down_anneals_from_the_current_factor_and_survives_the_checkpoint(tmp_path):
    for total, warmup in ((24, 4), (10, 0), (7, 7)):
        old, new = _old_warmup_cosine(total, warmup), WarmupCosine(total, warmup)
        assert [old(s) for s in range(total + 2)] == [new(s) for s in range(total + 2)]  # bit for bit
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    scheduler = warmup_cosine(optimizer, 24, 4)
    for _ in range(8):
        optimizer.step()
        scheduler.step()
    cool_down(scheduler, 8, 8)
    planned = WarmupCosine(24, 4).planned(8)
    torch.save(scheduler.state_dict(), tmp_path / "scheduler.pt")
    # a fresh scheduler (as a resumed run builds it) restored from the checkpoint's plain-tensor state
    restored = warmup_cosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5), 24, 4)
    restored.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))
    factor = restored.lr_lambdas[0]
    assert [factor(s) for s in range(8)] == [WarmupCosine(24, 4)(s) for s in range(8)]
    assert [factor(s) for s in range(8, 16)] == pytest.approx(
        [planned * 0.5 * (1 + math.cos(math.pi * (s - 8) / 8)) for s in range(8, 16)], rel=1e-12)
    assert factor(16) == 0.0 and restored.get_last_lr() == scheduler.get_last_lr()


# --------------------------------------------------------------------------- a run that stops
def test_a_run_whose_rule_triggers_ends_early_with_its_lr_annealed_and_says_why(data, tmp_path):
    """min_delta 1: no epoch counts as an improvement, so the rule triggers at epoch 2 (patience 1 needs 2
    measured epochs); a cool-down of 1.0 x 2 epochs: the run ends at epoch 4 of at most 6."""
    metrics = train(config(data, tmp_path / "run", **ALWAYS))
    assert (metrics["stopped_epoch"], metrics["stop_trigger_epoch"], metrics["epochs"]) == (4, 2, 4)
    assert metrics["end_reason"] == "stopped early by the held-out KL at epoch 4 of at most 6 (trigger at epoch 2)"
    rows = read_metrics(tmp_path / "run")
    assert [r["phase"] for r in rows] == [TRAIN, TRAIN, COOL_DOWN, COOL_DOWN]
    lrs = [float(r["lr"]) for r in read_steps(tmp_path / "run")]
    assert len(lrs) == 4 * STEPS
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["warmup_epochs"] == 1.0 and saved["stop_patience"] == 1   # the recipe's warm-up, the rule as given
    lr, planned = saved["lr"], WarmupCosine(6 * STEPS, STEPS).planned(2 * STEPS)
    assert lrs[:2 * STEPS] == pytest.approx([lr * WarmupCosine(6 * STEPS, STEPS)(s) for s in range(2 * STEPS)])
    k = 2 * STEPS
    assert lrs[2 * STEPS:] == pytest.approx([lr * planned * 0.5 * (1 + math.cos(math.pi * i / k)) for i in range(k)])
    assert lrs[-1] < 0.05 * lrs[2 * STEPS] and lrs == sorted(lrs[:STEPS]) + sorted(lrs[STEPS:], reverse=True)
    report = report_run(tmp_path / "run")
    assert report.summary.startswith("final: epoch 4 of 6, ")
    assert report.summary.endswith("; stopped early by the held-out KL at epoch 4 of at most 6 (trigger at epoch 2)")
    assert list(report.table["phase"]) == [TRAIN, TRAIN, COOL_DOWN, COOL_DOWN]


def test_the_start_line_states_the_rule_and_the_log_its_trigger(data, tmp_path, capsys):
    train(config(data, tmp_path / "run", progress=True, **ALWAYS))
    out = capsys.readouterr()
    start = out.err.splitlines()[0]
    assert start.startswith("recipe: small-grey") and start.endswith(
        "; stopping rule: when the held-out KL has not fallen 100% below its best in 1 epoch, the learning rate "
        "anneals to 0 over 100% of the epochs run and the run ends; at most 6 epochs")
    assert "epoch 2: held-out KL " in out.out and ("in 1 epoch; the learning rate anneals to 0 over 2 epochs, the run "
                                                   "ends at epoch 4 of at most 6") in out.out


def test_without_the_rule_or_when_it_never_triggers_the_student_is_the_fixed_schedules(data, tmp_path, monkeypatch):
    """stop_patience 0 is today's run; a rule that never triggers (the KL halves every epoch) trains the very
    same student over the cap; metrics.csv has a phase column only with the rule."""
    scripted_kl(monkeypatch, [2.0 ** -i for i in range(9)])
    plain = train(config(data, tmp_path / "plain", epochs=3))
    train(config(data, tmp_path / "zero", epochs=3, stop_patience=0))
    never = train(config(data, tmp_path / "never", epochs=3, stop_patience=1))
    assert students_equal(tmp_path / "plain", tmp_path / "zero") and students_equal(tmp_path / "plain", tmp_path / "never")
    assert plain["end_reason"] == "ran the fixed 3 epochs" and plain["stopped_epoch"] is None
    assert never["end_reason"] == "reached the cap of 3 epochs" and never["stopped_epoch"] is None
    assert "phase" not in read_metrics(tmp_path / "plain")[0]
    assert [r["phase"] for r in read_metrics(tmp_path / "never")] == [TRAIN] * 3
    assert report_run(tmp_path / "plain").summary.endswith("; ran the fixed 3 epochs")
    assert report_run(tmp_path / "never").summary.endswith("; reached the cap of 3 epochs")


# --------------------------------------------------------------------------- kills and resumes
# (fault point, what is saved when it kills): with ALWAYS the rule triggers after epoch 2, the run ends after 4
KILLS = {"epoch-saved:1": "before the trigger: epoch 1 saved",
         "epoch-saved:2": "the trigger epoch's checkpoint saved, its metrics.csv not yet",
         "train-step:11": "in the cool-down, mid-epoch 3",
         "epoch-saved:4": "the last epoch saved, no student.pt yet"}


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(config(data, run, **ALWAYS))
    return run


@pytest.mark.parametrize("fault", KILLS)
def test_a_run_killed_before_or_after_the_trigger_resumes_to_the_same_student(data, uninterrupted, tmp_path, fault):
    run = tmp_path / "run"
    code, message = run_forked(lambda: train(config(data, run, **ALWAYS)), fault=fault)
    assert code == KILLED, f"the fault point {fault} was never reached: {message}"
    metrics = train(config(data, run, resume=True, **ALWAYS))
    assert metrics["stopped_epoch"] == 4 and metrics["stop_trigger_epoch"] == 2
    assert_same_student(run, uninterrupted)   # the student bit for bit, metrics.csv and steps.csv


def test_the_cool_down_is_rebuilt_from_the_history_when_the_checkpoint_lacks_it(data, uninterrupted, tmp_path):
    """A checkpoint whose scheduler kept no state of its factor (a plain function's, as torch stores it) still
    resumes in the cool-down: the trigger is decided again from the history's val_kl."""
    run = tmp_path / "run"
    assert run_forked(lambda: train(config(data, run, **ALWAYS)), fault="epoch-saved:3")[0] == KILLED
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["scheduler"]["lr_lambdas"][0]["cool_down_start"] == 2 * STEPS
    state["scheduler"]["lr_lambdas"] = [None]
    torch.save(state, run / "checkpoint.pt")
    train(config(data, run, resume=True, **ALWAYS))
    assert_same_student(run, uninterrupted)


# --------------------------------------------------------------------------- refusals and the recipe's rule
def test_an_explicit_rule_without_a_held_out_split_is_a_one_line_error(data, tmp_path):
    cases = [({"val_shards": "none"}, r"\(--val-shards none\)"),
             ({"shards": str(data["plain"])}, r"\(--val-shards auto: no complete val/ beside --shards\)")]
    for options, where in cases:
        with pytest.raises(UserError, match=r"--stop-patience 2 stops on the held-out synthetic split's KL and there "
                                            rf"is none {where}: `synth generate` writes a val/ split .* or use "
                                            r"--stop-patience 0"):
            train(config(data, tmp_path / "run", stop_patience=2, **options))
        assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(main, ["train", "--shards", str(data["plain"]), "--student", "lenet5_half", "--out",
                                       str(tmp_path / "cli"), "--stop-patience", "2", "--quiet"])
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("recipe: ")]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: --stop-patience 2"), result.output
    for flag, value in (("--stop-cooldown", "0"), ("--stop-cooldown", "1.5"), ("--stop-patience", "-1"),
                        ("--stop-min-delta", "-0.1")):
        result = CliRunner().invoke(main, ["train", "--shards", str(data["shards"]), "--student", "lenet5_half",
                                           "--out", str(tmp_path / "cli"), flag, value])
        assert result.exit_code == 2 and f"Error: {flag} must be" in result.output, result.output


def test_a_recipes_rule_falls_back_to_the_fixed_schedule_without_a_split(data, tmp_path, capsys):
    recipe = tmp_path / "stopping.toml"
    recipe.write_text("[distill]\nstop_patience = 1\nstop_min_delta = 1.0\n")
    metrics = train(config(data, tmp_path / "plain", shards=str(data["plain"]), recipe=str(recipe), epochs=3))
    start = capsys.readouterr().err.splitlines()[0]
    assert start.endswith("; recipe stopping.toml [distill] stop_patience 1 needs a held-out split and there is none "
                          "(--val-shards auto: no complete val/ beside --shards): the fixed schedule of 3 epochs")
    assert metrics["epochs"] == 3 and metrics["end_reason"] == "ran the fixed 3 epochs"
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["stop_patience"] == 0
    with_split = train(config(data, tmp_path / "split", recipe=str(recipe), epochs=4))
    assert with_split["stopped_epoch"] == 3 and "stopping rule: " in capsys.readouterr().err


def test_resume_refuses_another_rule_or_another_split(data, tmp_path, killed_at_epoch):
    with killed_at_epoch(2):
        train(config(data, tmp_path / "run", epochs=4, stop_patience=2))
    for change, old_new in (({"stop_patience": 3}, "stop_patience 2 -> 3"), ({"stop_patience": 0}, "stop_patience 2 -> 0"),
                            ({"stop_min_delta": 0.1}, "stop_min_delta 0.05 -> 0.1"),
                            ({"stop_cooldown": 0.5}, "stop_cooldown 0.2 -> 0.5")):
        with pytest.raises(UserError, match=rf"other settings \({old_new}\): resume with the same options"):
            train(config(data, tmp_path / "run", epochs=4, resume=True, **({"stop_patience": 2} | change)))
    with pytest.raises(UserError, match=r"compared its epochs for --stop-patience on the held-out split .*shards/val, "
                                        r"not on .*other_val: resume with --val-shards"):
        train(config(data, tmp_path / "run", epochs=4, stop_patience=2, resume=True, val_shards=str(data["other_val"])))
    assert train(config(data, tmp_path / "run", epochs=4, stop_patience=2, resume=True))["epochs"] >= 2


# --------------------------------------------------------------------------- the benchmark
def test_the_benchmark_counts_a_stopped_run_as_finished_and_shows_its_epochs(data, uninterrupted, tmp_path,
                                                                               monkeypatch, load_pipeline):
    bench = load_pipeline("bench_methods")
    # a run the rule ended at epoch 4 of at most 6 is finished; before its student.pt, or before the cool-down, not
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "metrics.csv").write_text((uninterrupted / "metrics.csv").read_text().replace(",,", ",97.5,"))
    assert bench.final_top1(stopped, 6) is None               # no student.pt: killed before its last file
    (stopped / "student.pt").write_bytes((uninterrupted / "student.pt").read_bytes())
    assert bench.final_top1(stopped, 6) == 97.5 and bench.epochs_run(stopped) == 4
    lines = (stopped / "metrics.csv").read_text().splitlines()
    (stopped / "metrics.csv").write_text("\n".join(lines[:-2]) + "\n")   # epochs 1-2: no cool-down yet
    assert bench.final_top1(stopped, 6) is None
    # the rows: the ensemble's shards, --stop-patience 2, the cap (x2 in the second), on mnistm-grey and mnistm100 too
    rows = {name: bench.STAGE_TWO_ROWS[name] for name in bench.STOP_ROWS}
    assert rows == {"generator ensemble, stop on the held-out KL": ("generator ensemble", {"stop-patience": 2}),
                    "generator ensemble, stop on the held-out KL, cap twice the epochs": (
                        "generator ensemble", {"stop-patience": 2, "epochs": 2.0})}
    for name in ("mnistm-grey", "mnistm100"):
        assert set(rows) <= set(bench.CONFIGS[name]["only"]) and "generator ensemble" in bench.CONFIGS[name]["only"]
    # a seed that stopped early: finished, its epochs in the table ("4 / 6 of 6"), its CPU measured as any run's
    commands = []

    def fake_run(cmd, log):
        commands.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        epochs = 4 if out.name.endswith("seed0") else int(cmd[cmd.index("--epochs") + 1])
        phase = "cool-down" if epochs < int(cmd[cmd.index("--epochs") + 1]) else "train"
        (out / "metrics.csv").write_text("epoch,eval_top1,phase\n" + "".join(
            f"{e},{90 + e},{phase if e == epochs else 'train'}\n" for e in range(1, epochs + 1)))
        (out / "student.pt").write_bytes(b"")
        return 1.0, 3.0 * epochs
    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setitem(bench.CONFIGS["mnistm-grey"], "distill_epochs", 3)   # the row's cap: 6
    shards = tmp_path / "out" / "mnistm-grey" / "shards" / "generator-ensemble"
    shards.mkdir(parents=True)
    (shards / "bench_timing.json").write_text('{"wall_s": 30.0, "cpu_s": 40.0}')
    row = "generator ensemble, stop on the held-out KL, cap twice the epochs"
    result = bench.bench_variant("python", tmp_path / "out", "mnistm-grey", row, [0, 1], "data")
    assert all(c[c.index("--stop-patience") + 1] == "2" and c[c.index("--epochs") + 1] == "6" for c in commands)
    assert result["top1"] == {0: 94.0, 1: 96.0} and result["epochs_run"] == {0: 4, 1: 6} and result["epochs"] == 6
    assert result["distill_cpu_s"] == pytest.approx((12.0 + 18.0) / 2)
    assert bench.epochs_cell(result) == "4 / 6 of 6" and bench.epochs_cell(result | {"epochs_run": {0: 6}}) == "6"
    result["teacher_top1"] = 99.0
    bench.write_results(tmp_path / "out", [result], 1.0, 1)
    assert "| 4 / 6 of 6 |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "results.csv").read_text().splitlines()[1].endswith(",6,15.0,55.0,4 6")
    commands.clear()
    assert bench.bench_variant("python", tmp_path / "out", "mnistm-grey", row, [0, 1], "data")["top1"] == result["top1"]
    assert commands == []   # finished: a rerun trains nothing
