"""pipelines/bench_cifar.py, the one command that reproduces the papers' CIFAR table: its CPU smoke (the whole
command at tiny sizes on stand-in CIFAR files and random bundle-format checkpoints) and its --estimate."""
import json
from pathlib import Path

TINY = ["--pairs", "cifar100-wrn_40_2-wrn_16_2", "--seeds", "1", "--images", "16", "--real-images", "16",
        "--distill-epochs", "1", "--set", "num_generators=1", "--set", "steps=1", "--set", "train_batch_size=4",
        "--synth-set", "shard-size=16", "--synth-set", "write-batch-size=16", "--synth-set", "val-images=0",
        "--distill-set", "batch-size-per-rank=8", "--distill-set", "workers=0"]


def _bench_cifar(monkeypatch, load_pipeline):
    """The pipeline, its child commands run in this process (each child would spend seconds importing torch; the
    GPU check's dry run runs them as child processes): the same command lines, through the same CLIs."""
    from dfkd.distill.cli import main as distill_main
    from dfkd.synth.cli import main as synth_main

    bench = load_pipeline("bench_cifar")
    methods = load_pipeline("bench_methods")

    def run_here(cmd, log, threads):
        log.parent.mkdir(parents=True, exist_ok=True)
        if cmd[1:3] == ["-m", "dfkd.synth"] or cmd[1:3] == ["-m", "dfkd.distill"]:
            cli = synth_main if cmd[2] == "dfkd.synth" else distill_main
            try:
                cli(cmd[3:], standalone_mode=False)
            except SystemExit as e:
                assert not e.code, cmd
        else:
            assert cmd[1].endswith("bench_methods.py") and cmd[2] == "--write-real", cmd
            arch, weights, data, root, n, out = cmd[3:]
            methods.write_real_shards(arch, Path(weights), data, root, int(n), Path(out))
        return 1.0, 1.0

    monkeypatch.setattr(bench, "run", run_here)
    return bench


def test_the_reproduce_command_runs_on_standin_cifar_and_writes_the_published_numbers_beside_ours(tmp_path, monkeypatch, load_pipeline):
    bench = _bench_cifar(monkeypatch, load_pipeline)
    results = tmp_path / "cifar.md"
    bench.main(["--standin", str(tmp_path / "standin"), "--out", str(tmp_path / "out"), "--results", str(results),
                *TINY])
    out = tmp_path / "out"
    table = (out / "results.md").read_text()
    assert "| ours: generator ensemble |" in table and "| ours: real training images (ceiling) |" in table
    assert "| published: NAYER (about) | 71.70 |" in table
    assert "cifar100_wrn_40_2.pth" in results.read_text() or "NAYER" in results.read_text()
    run = out / "cifar100-wrn_40_2-wrn_16_2" / "runs" / "generator-ensemble-seed0"
    assert json.loads((run / "config.json").read_text())["recipe_used"]["name"] == "cifar100"   # the no-flag recipe
    # the estimate: synth generate --estimate per row and a timed burst of stage two, projected to the table
    bench.main(["--standin", str(tmp_path / "standin"), "--out", str(out), "--estimate", "--estimate-steps", "1",
                "--methods", "generator-ensemble", *TINY])
    estimate = json.loads((out / "estimate" / "estimate.json").read_text())
    assert estimate["total_s"] > 0 and estimate["rows"][0][2] == "cifar100"
    assert "Projected total" in (out / "estimate" / "estimate.md").read_text()
