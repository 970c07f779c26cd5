"""The shipped text speaks of the product and its users: no tracker numbers, and nothing about how the machines
that measured it were handed out. Checked over the docs, the results, README, the recipes, and every comment and
docstring of the packages, pipelines and tests (code itself may say `session`: pytest's fixture scope,
onnxruntime's InferenceSession)."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = re.compile(r"issue[ -]?#?\d|\bsessions?\b|\bloans?\b|\blent\b|\bcarry[- ]folder limit|\b64 MiB\b",
                   re.IGNORECASE)
TEXT = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "results").glob("*.md")),
        *sorted((REPO / "common" / "recipes").glob("*.toml")), *sorted((REPO / "shards").glob("*.md"))]
CODE_FOLDERS = ("common", "synth", "distill", "pipelines", "tests")


def _prose_of_python(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    source = path.read_text(encoding="utf-8")
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((node.body[0].lineno, doc))
    return found


def _offending(pairs, where: str) -> list[str]:
    return [f"{where}:{line}: {m.group(0)!r}" for line, text in pairs for m in WORDS.finditer(text)]


def test_the_shipped_text_names_no_tracker_numbers_and_no_workplace_limits():
    bad = []
    for path in TEXT:
        lines = path.read_text(encoding="utf-8").splitlines()
        bad += _offending(enumerate(lines, 1), str(path.relative_to(REPO)))
    for folder in CODE_FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == Path(__file__).name:
                continue
            bad += _offending(_prose_of_python(path), str(path.relative_to(REPO)))
        for path in sorted((REPO / folder).rglob("*.sh")):
            comments = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if "#" in line]
            bad += _offending(comments, str(path.relative_to(REPO)))
    assert not bad, "say what the product does instead:\n" + "\n".join(bad)


def test_the_check_finds_the_words_it_is_for(tmp_path):
    assert _offending([(1, "# see issue 12")], "x") and _offending([(1, "no GPU was lent")], "x")
    assert _offending([(1, "did not fit the session")], "x")
    assert not _offending([(1, "the equivalent teacher, relentless")], "x")
    code = tmp_path / "m.py"
    code.write_text('"""Docstring."""\n@fixture(scope="session")  # a comment of issue-4\ndef f():\n'
                    '    """Made for a GPU loan."""\n')
    assert [b.split(": ")[1] for b in _offending(_prose_of_python(code), "m")] == ["'issue-4'", "'loan'"]
