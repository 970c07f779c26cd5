"""The documentation stays true: README's quick-start commands run (with tiny sizes), every relative link and
anchor resolves, every number of README's results table links to a results file that holds it, docs/layout.md
lists every file, and a results file's generated part is refreshed without losing its notes."""
import datetime
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "results").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")


def fenced_blocks(text: str, language: str = "") -> list[str]:
    return re.findall(r"^```" + language + r"\n(.*?)^```", text, flags=re.S | re.M)


def without_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def section(text: str, heading_prefix: str) -> str:
    """The text of every `## ` section whose heading starts with heading_prefix."""
    parts = re.split(r"^(## .*)$", text, flags=re.M)
    return "\n".join(body for head, body in zip(parts[1::2], parts[2::2]) if head[3:].startswith(heading_prefix))


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text.replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in without_code(path.read_text()).splitlines():
        match = re.match(r"^#{1,6} (.*)$", line)
        if match:
            base = github_anchor(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_the_readme_is_short_and_is_the_packages_long_description():
    import configparser
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    assert config["metadata"]["long_description"].strip() == "file: README.md"
    assert len(README.read_text().splitlines()) <= 250
    for command in ("bash pipelines/mnist.sh", "bash pipelines/test.sh"):  # the two set-up commands
        assert command in section(README.read_text(), "Set-up commands")


def test_github_anchors_follow_githubs_rules():
    assert github_anchor("Stored or online teacher logits") == "stored-or-online-teacher-logits"
    assert github_anchor("The teacher's view of low-resolution images (`--teacher-view`)") == \
        "the-teachers-view-of-low-resolution-images---teacher-view"
    assert github_anchor("MNIST-M 64 px, MUSE 16 / 32 / 64 px") == "mnist-m-64-px-muse-16--32--64-px"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc):
    bad = []
    for text, target in LINK.findall(without_code(doc.read_text())):
        if re.match(r"^[a-z]+:", target):  # http(s)://, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            bad.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(f"{target}: no heading with that anchor in {path.relative_to(ROOT)}")
    assert not bad, f"{doc.relative_to(ROOT)}: " + "; ".join(bad)


def test_every_number_of_the_results_table_links_to_a_results_file_that_holds_it():
    lines = section(README.read_text(), "Results").splitlines()
    table = [line for line in lines if line.startswith("|") and not re.fullmatch(r"[|\-: ]+", line)][1:]
    assert len(table) >= 4 and table[0].startswith("| MNIST, lenet5 -> lenet5_half")
    checked = 0
    for row in table:
        for cell in row.strip("|").split("|")[1:]:  # the first cell names the benchmark
            assert not re.search(r"\d", LINK.sub("", cell)), f"a number without a link: {cell!r}"
            for text, target in LINK.findall(cell):
                file = target.partition("#")[0]
                assert file.startswith("results/"), target
                held = (ROOT / file).read_text()
                for number in re.findall(r"\d+(?:\.\d+)?", text):
                    assert number in held, f"{number} is not in {file}"
                    checked += 1
    assert checked >= 20


def test_results_files_name_date_machine_commit_and_command():
    for path in sorted((ROOT / "results").glob("*.md")):
        if path.name == "README.md":
            continue
        head = path.read_text()[:1500]
        for field in ("- Date: ", "- Machine: ", "- Commit: ", "- Command: `"):
            assert field in head, f"{path.name} has no {field.strip()!r} line in its header"


def test_user_docs_speak_of_datasets_not_of_work_items():
    for doc in [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "results").glob("*.md"))]:
        text = doc.read_text()
        assert not re.search(r"\bissue \d+", text, flags=re.I), doc.name
    for recipe in sorted((ROOT / "common" / "recipes").glob("*.toml")):
        assert not re.search(r"\bissue \d+", recipe.read_text(), flags=re.I), recipe.name


# ---- the layout page lists every file -------------------------------------------------------------------------
LISTED_FOLDERS = ("common", "synth", "distill", "pipelines")


def project_files() -> set[str]:
    files = set()
    for folder in LISTED_FOLDERS:
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith((".pyc", ".egg-info")):
                files.add(path.relative_to(ROOT).as_posix())
    return files


def test_the_layout_page_lists_every_file_and_only_existing_ones():
    listed = {p for p in re.findall(r"^\| `([^`]+)`", (ROOT / "docs" / "layout.md").read_text(), flags=re.M)
              if p.split("/")[0] in LISTED_FOLDERS}
    assert project_files() - listed == set(), "files missing from docs/layout.md"
    assert listed - project_files() == set(), "docs/layout.md lists files that do not exist"


# ---- the quick start runs -------------------------------------------------------------------------------------
# Tiny sizes per command: a flag here replaces the one in the README (None: drop it); `--set` values are added.
TINY = {
    ("distill", "teacher"): {"--epochs": "1", "--batch-size": "16", "--threads": "1"},
    ("synth", "generate"): {"--num-images": "24", "--shard-size": "12", "--write-batch-size": "12", "--threads": "1",
                            "--set": ["num_generators=1", "steps=2", "train_batch_size=10", "width=4",
                                      "latent_dim=8"]},
    ("distill", "train"): {"--epochs": "1", "--batch-size-per-rank": "8", "--workers": "1", "--threads": "1"},
    ("distill", "report"): {},
}
# A teacher the test can build without a download: random weights at 32 px, 10 classes.
NO_DOWNLOAD = {"--weights": "none", "--resolution": "32", "--num-classes": "10"}
NO_DATASET = {"--eval-data": None}  # /data/imagenet/val is not on a CI machine


def quick_start_commands() -> list[list[str]]:
    text = section(README.read_text(), "Quick start")
    commands = []
    for block in fenced_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


def tiny(argv: list[str], overrides: dict) -> list[str]:
    argv = list(argv)
    for flag, value in overrides.items():
        if flag == "--set":
            continue
        while flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
        if value is not None:
            argv += [flag, value]
    for value in overrides.get("--set", []):
        argv += ["--set", value]
    return argv + ["--quiet"] if argv[1] in ("generate", "train", "teacher") else argv


def write_fake_mnist(root: Path, n: int = 64) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + b"".join(
            d.to_bytes(4, "big") for d in images.shape) + images.tobytes())
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + labels.tobytes())


def test_the_quick_start_parses_into_known_commands():
    commands = quick_start_commands()
    assert [c[:2] for c in commands].count(["synth", "generate"]) == 2   # the ImageNet teacher and the MNIST one
    assert [c[:2] for c in commands].count(["distill", "train"]) == 2
    unknown = [c for c in commands if tuple(c[:2]) not in TINY]
    assert not unknown, f"quick-start commands this test does not know how to run small: {unknown}"


def test_every_quick_start_command_runs_with_tiny_sizes(tmp_path, monkeypatch):
    """Each command of README's quick start, as written, with only sizes made tiny (and, for the ImageNet teacher,
    random weights at 32 px instead of a download, and no ImageNet evaluation set): through the same click
    commands `python -m dfkd.synth` and `python -m dfkd.distill` run, in a fresh folder with a fake MNIST in data/."""
    from dfkd.distill.cli import main as distill_main
    from dfkd.synth.cli import main as synth_main

    monkeypatch.chdir(tmp_path)
    write_fake_mnist(tmp_path / "data")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "README.md").write_text("the repository's shards/ folder holds this file\n")
    clis = {"synth": synth_main, "distill": distill_main}
    download_free = False
    for argv in quick_start_commands():
        overrides = dict(TINY[argv[0], argv[1]])
        if argv[:2] == ["synth", "generate"] and "--weights" not in argv:
            overrides.update(NO_DOWNLOAD)
            download_free = True
        if argv[:2] == ["distill", "train"] and "/" in argv[argv.index("--eval-data") + 1]:
            overrides.update(NO_DATASET)
        args = tiny(argv, overrides)[1:]
        result = CliRunner().invoke(clis[argv[0]], args, catch_exceptions=False)
        assert result.exit_code == 0, f"{shlex.join(argv)}\n-> {shlex.join(args)}\n{result.output}"
    assert download_free
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mnist-kd", "r18", "teacher"]
    for run in ("r18", "mnist-kd"):
        assert (tmp_path / "runs" / run / "student.pt").exists() and (tmp_path / "runs" / run / "curves.png").exists()


# ---- results files: the header and the refresh that keeps notes ----------------------------------------------
def test_a_results_file_is_refreshed_between_its_marks_and_keeps_its_notes(tmp_path):
    sys.path.insert(0, str(ROOT / "pipelines"))
    try:
        import results_header as rh
    finally:
        sys.path.remove(str(ROOT / "pipelines"))
    when = datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc)
    path = tmp_path / "results" / "bench.md"
    rh.write_results_file(path, "| a |\n|---|\n| 1.00 |\n", title="A bench", command="python bench.py --x", now=when)
    first = path.read_text()
    assert first.startswith("# A bench\n")
    assert "- Date: 2026-01-02 03:04 UTC" in first and "- Command: `python bench.py --x`" in first
    assert "- Machine: " in first and "cores" in first and "- Commit: " in first
    path.write_text(first + "\n## Notes (2026-01-02)\n\nwhat was tried and lost\n")
    rh.write_results_file(path, "| a |\n|---|\n| 2.00 |\n", title="ignored", command="python bench.py --y", now=when)
    second = path.read_text()
    generated = second[second.index(rh.START):second.index(rh.END)]
    assert "| 2.00 |" in generated and "--y" in generated and "| 1.00 |" not in generated and "--x" not in generated
    earlier = second[second.index(rh.END):second.index("## Notes")]  # the replaced run stays, dated, below it
    assert earlier.count("### Earlier run: 2026-01-02 03:04 UTC") == 1 and "| 1.00 |" in earlier and "--x" in earlier
    assert second.startswith("# A bench\n") and second.endswith("## Notes (2026-01-02)\n\nwhat was tried and lost\n")
    assert rh.commit(tmp_path) == "unknown"  # not a git work tree
    assert rh.command_line([str(ROOT / "pipelines" / "mnist.py"), "--out", "runs/x y"]) == \
        "python pipelines/mnist.py --out 'runs/x y'"


def test_the_shipped_results_files_with_marks_have_them_in_order():
    sys.path.insert(0, str(ROOT / "pipelines"))
    try:
        import results_header as rh
    finally:
        sys.path.remove(str(ROOT / "pipelines"))
    for path in sorted((ROOT / "results").glob("*.md")):
        text = path.read_text()
        if rh.START in text or rh.END in text:
            assert text.count(rh.START) == text.count(rh.END) == 1, path.name
            assert text.index(rh.START) < text.index(rh.END), path.name
