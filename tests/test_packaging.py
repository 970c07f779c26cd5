"""What a user installs: one distribution, dfkd, whose packages are dfkd.common, dfkd.synth and dfkd.distill
(mapped from the checkout's common/, synth/ and distill/ folders), so nothing of ours lands at the top level of a
user's environment; and no file of the project still imports, runs or documents the old top-level names."""
import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD = ("common", "synth", "distill")   # the folders; installed as dfkd.common, dfkd.synth, dfkd.distill
SKIP = {".git", ".venv", "build", "runs", "data", "shards", "__pycache__"}
# an import of an old name inside a string (a script run with python -c, a docstring example), `-m synth` in a
# command line or an argument list
OLD_IN_TEXT = re.compile(r"(?:^|[\"'])[ \t]*(?:from (?:common|synth|distill)(?:\.\w+)* import\b"
                         r"|import (?:common|synth|distill)(?:\.\w+)*(?:\s+as\s+\w+)?[ \t]*(?:[,;\"']|\\n|$))"
                         r"|(?<![\w.-])-m (?:synth|distill)\b(?![.\w-])|[\"']-m[\"'], [\"'](?:synth|distill)[\"']",
                         re.M)


def project_files(suffix: str) -> list[Path]:
    return sorted(p for p in ROOT.rglob(f"*{suffix}") if not SKIP & set(p.relative_to(ROOT).parts))


def old_imports(path: Path) -> list[str]:
    """`import common...` / `from synth... import` (absolute, level 0) in a Python file, with their lines."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] in OLD]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] in OLD:
            found.append(f"{node.lineno}: from {node.module} import ...")
    return found


def test_no_file_imports_the_old_top_level_names():
    bad = {str(p.relative_to(ROOT)): old_imports(p) for p in project_files(".py")}
    assert {p: lines for p, lines in bad.items() if lines} == {}, "import dfkd.common / dfkd.synth / dfkd.distill"


def test_no_file_runs_or_documents_the_old_module_names():
    """Scripts in strings, `python -m synth` in docs and messages, ["-m", "distill"] in subprocess calls."""
    bad = {}
    for path in project_files(".py") + project_files(".md") + project_files(".sh"):
        if path.relative_to(ROOT).parts[0] == "results" or path == Path(__file__).resolve():
            continue   # dated records of runs (the command lines as they were run); this file's examples
        text = path.read_text()
        hits = [f"{text.count(chr(10), 0, m.start()) + 1}: {m.group(0).strip()}" for m in OLD_IN_TEXT.finditer(text)]
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    assert bad == {}, "use the console commands, `-m dfkd.synth` / `-m dfkd.distill`, and dfkd.* imports"


def test_the_old_names_are_caught():
    """The two checks above find what they look for (a check that cannot fail proves nothing)."""
    assert OLD_IN_TEXT.search('script = "from common.shards import read_manifest"')
    assert OLD_IN_TEXT.search('cmd = [sys.executable, "-m", "synth", "generate"]')
    assert OLD_IN_TEXT.search("torchrun --nproc_per_node=2 -m distill train ...")
    assert not OLD_IN_TEXT.search('[sys.executable, "-m", "dfkd.synth"] and torchrun -m dfkd.distill train')
    assert OLD_IN_TEXT.search('"import common.plots, distill\\n"')
    assert not OLD_IN_TEXT.search("the synth command reads from synth's shards\nimport synth and distill: fast")


def test_the_old_import_check_finds_an_old_import(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("import os\nfrom dfkd.common import fileio\nfrom .data import x\n"
                      "def f():\n    import synth.cli as c\n    from distill.train import train\n")
    assert old_imports(source) == ["5: import synth.cli", "6: from distill.train import ..."]


def test_the_wheel_holds_only_the_dfkd_packages_and_the_recipes(tmp_path):
    """`pip wheel .` (no dependencies, no build isolation: seconds) of a copy of the checkout's package files: every
    module of common/, synth/ and distill/ under dfkd/, the shipped recipes, the metadata, and nothing else."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in OLD:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "wheel")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "wheel").glob("dfkd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"dfkd"}
    expected = {f"dfkd/{p.relative_to(src).as_posix()}" for folder in OLD for p in (src / folder).rglob("*")
                if p.is_file() and (p.suffix == ".py" or p.parent.name == "recipes" and p.suffix == ".toml")}
    assert any(n.startswith("dfkd/common/recipes/") and n.endswith(".toml") for n in expected)
    assert {n for n in names if not n.split("/")[0].endswith(".dist-info")} == expected
    assert "dfkd/__init__.py" not in names   # dfkd is a namespace: other distributions may add to it
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "synth = dfkd.synth.cli:main" in text and "distill = dfkd.distill.cli:main" in text


def test_the_installed_recipes_are_found():
    """The recipes are looked up next to the installed module (as in the wheel), and the commands run as
    `python -m dfkd.synth` / `python -m dfkd.distill`."""
    from dfkd.common.recipes import RECIPE_DIR

    assert (RECIPE_DIR / "small-grey.toml").is_file()
    for stage in ("synth", "distill"):
        done = subprocess.run([sys.executable, "-m", f"dfkd.{stage}", "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "Usage:" in done.stdout, done.stderr
