"""The pipelines run on the library's public API: no private names imported from common/, synth/ or distill/,
no sys.path edits (they run in the project's environment, where the package is installed), and the
synthesis-speed benchmark's writing measurements run."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted((ROOT / "pipelines").glob("*.py"))
LIBRARY = ("dfkd",)   # dfkd.common, dfkd.synth, dfkd.distill


# pipelines that run where the project's environment is not installed, and why: they put the checkout (and the
# wheels they carry) on sys.path themselves
OUTSIDE_THE_ENVIRONMENT = {"gpu_check.py": "runs from a plain checkout on an offline GPU machine with carried wheels"}


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_a_pipeline_imports_only_public_names_and_leaves_sys_path_alone(path):
    tree = ast.parse(path.read_text(), str(path))
    private, path_edits = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARY:
            private += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys"):
            path_edits.append(node.lineno)
    assert private == [], f"{path.name} imports private names"
    if path.name not in OUTSIDE_THE_ENVIRONMENT:
        assert path_edits == [], f"{path.name} edits sys.path (lines {path_edits})"


def test_bench_synthesis_writing_measurements_run(tmp_path, load_pipeline):
    """The writing rows time `synth.generate.shard_batches` + `synth.writer.write_shard` as `synth generate`
    writes a shard (its RNG, a writer process), at the smallest size."""
    import torch

    from dfkd.common.accel import Compute

    bench = load_pipeline("bench_synthesis")
    case = bench.Case("lenet5", 28, "cpu", gen_batch=4, generators=1, write_batch=10, write_images=20,
                      di_iterations=1, di_low_res=False)
    compute = Compute(torch.device("cpu"))
    setup = bench.writing_setup(case, "generator", compute, tmp_path / "state")
    for workers in (0, 1):
        assert bench.time_writing(setup, workers, tmp_path / "shard.tar", compute) > 0
    assert bench.time_writing_limit(setup, compute) > 0
    assert bench.time_encoding(setup, compute) > 0


def test_budget_curve_tables_and_draws_the_rows_of_bench_outputs(tmp_path, load_pipeline):
    """Rows of two bench_methods outputs of one configuration: the total CPU and the share of the ceiling in the
    table, the chart beside the results file; an output written before the CPU columns is a one-line error."""
    curve = load_pipeline("budget_curve")
    header = ("config,method,images,synthesis_cpu_s,synthesis_wall_s,images_per_cpu_s,student_top1_mean,"
              "student_top1_std,student_top1_per_seed,teacher_top1,distill_epochs,distill_cpu_s,total_cpu_s\n")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "results.csv").write_text(header
                                   + "mnistm32,generator ensemble,20000,300,400,66.7,90.00,0.50,89.50 90.50,99.4,10,1200,1500\n"
                                   + "mnistm32,real training images (ceiling),20000,50,60,400,99.00,0.00,99.00,99.4,10,,\n"
                                   + "mnist28,generator ensemble,10000,30,40,333,98.00,0.00,98.00,99.4,5,100,130\n")
    (b / "results.csv").write_text(header
                                   + "mnistm32,generator ensemble,40000,400,500,100,93.00,1.00,92.00 94.00,99.4,10,2400,2800\n")
    results = tmp_path / "results" / "curve.md"
    text = curve.main([str(a), str(b), "--config", "mnistm32", "--results", str(results)])
    assert "| generator ensemble | 20,000 x 10 | 300 | 1200 | 1500 | 90.00 +- 0.50 (2) | 89.50 / 90.50 | 0.909 |" in text
    assert "| generator ensemble | 40,000 x 10 | 400 | 2400 | 2800 | 93.00 +- 1.00 (2) | 92.00 / 94.00 | 0.939 |" in text
    assert "mnist28" not in text and "0.97 x ceiling = 96.03" in text
    assert results.is_file() and results.with_suffix(".png").stat().st_size > 1000
    assert "- Command: `python" in results.read_text()
    (a / "results.csv").write_text("config,method,images\nmnistm32,generator ensemble,20000\n")
    with pytest.raises(SystemExit, match="lacks distill_epochs, total_cpu_s"):
        curve.main([str(a), "--config", "mnistm32"])
