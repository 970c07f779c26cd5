"""pipelines/gpu_check.py: the dry run on the CPU (every part, tiny sizes, stand-in data) so that the prepared GPU
command cannot rot between runs on a GPU, and the carry folder's unpacking (wheels into a temporary site folder,
MNIST gunzipped, photographs copied) without network."""
import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    # as documented, through the wrapper (with this interpreter: PYTHON)
    proc = subprocess.run(["bash", str(REPO / "pipelines" / "gpu_check.sh"), "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert (out / "summary.json").is_file(), (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    parts = summary["parts"]
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:],
                                  {p: (v["status"], v.get("error")) for p, v in parts.items()})
    assert {p: v["status"] for p, v in parts.items()} == {p: "ok" for p in "abcdef"}
    assert parts["a"]["result"]["cuda_tests"].get("skipped", 0) >= 3   # no GPU here: reported as skipped
    b = parts["b"]["result"]
    assert b["kill_rerun"] == {"shards_before_kill": 1, "kept_untouched": True, "bytes_equal_uninterrupted_run": True}
    assert b["images"] == 96 and b["estimate"]["total_s"] > 0 and b["generate_wall_s"] > 0
    assert b["distill"]["images_per_s"] > 0
    c = parts["c"]["result"]
    assert c["backend"] == "gloo" and c["group_shards_equal"] and c["distill"]["images_per_s"] > 0
    assert {r["method"] for r in parts["d"]["result"]["eager"]} == {"generator", "muse", "deepinversion"}
    assert parts["d"]["result"]["compile"][0]["compile"] == "True"
    e = parts["e"]["result"]
    assert {r["method"] for r in e["mnistm32-methods"]} == {"generator ensemble", "real training images (ceiling)"}
    assert [r["method"] for r in e["mnistm64"]] == ["muse"]
    f = parts["f"]["result"]   # bench_cifar on stand-in CIFAR files: its estimate and one tiny pair
    assert f["estimate"]["total_s"] > 0 and [r["method"] for r in f["results"]] == ["generator ensemble"]
    md = (out / "summary.md").read_text()
    for p in "abcdef":
        assert f"| {p} |" in md and f"## {p}:" in md


def _wheel(folder: Path, name: str, module: str) -> Path:
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{name}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr(f"{name}-1.0.dist-info/RECORD", "")
    return path


def test_carry_wheels_go_to_a_temporary_site_folder_and_data_is_unpacked(tmp_path, monkeypatch, load_pipeline):
    gpu_check = load_pipeline("gpu_check")
    carry = tmp_path / "carry"
    (carry / "wheels").mkdir(parents=True)
    _wheel(carry / "wheels", "pyyaml", "yaml")   # a stand-in wheel: its `yaml` module says 42
    raw = carry / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    idx = b"\x00\x00\x08\x01\x00\x00\x00\x02\x03\x04"
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(idx)
    photos = carry / "data" / "mnistm" / "photos" / "train"
    photos.mkdir(parents=True)
    (photos / "a.png").write_bytes(b"png")
    monkeypatch.setattr(gpu_check, "importable", lambda module: module != "yaml")   # as if the machine lacked it

    site, data, done = gpu_check.unpack_carry(carry, tmp_path / "work")
    assert site == tmp_path / "work" / "site" and done["installed"] == ["pyyaml"]
    check = subprocess.run([sys.executable, "-c", "import yaml; print(yaml.VALUE)"], env={"PYTHONPATH": str(site)},
                           capture_output=True, text=True)
    assert check.stdout.strip() == "42", check.stderr
    assert (data / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes() == idx
    assert (data / "mnistm" / "photos" / "train" / "a.png").read_bytes() == b"png"


def test_carry_without_wheels_for_a_missing_package_is_a_clear_error(tmp_path, monkeypatch, load_pipeline):
    gpu_check = load_pipeline("gpu_check")
    monkeypatch.setattr(gpu_check, "importable", lambda module: module != "webdataset")
    with pytest.raises(SystemExit, match="--prepare DIR"):
        gpu_check.unpack_carry(tmp_path / "empty", tmp_path / "work")
