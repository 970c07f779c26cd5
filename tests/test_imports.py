"""The house's shape, read from the code's imports (every import, also those inside functions and under
TYPE_CHECKING): no import circle among common/, synth/ and distill/; synth and distill never import each
other; common/ holds only what both stages share; the shard contract reads a manifest without torch."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "synth", "distill")   # the checkout's folders, installed as dfkd.common, dfkd.synth, ...


def _modules() -> dict[str, Path]:
    """{installed module name (dfkd.common.models, ...): its file}."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = ["dfkd", *path.relative_to(ROOT).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _stage(module: str) -> str:
    """dfkd.synth.methods.base -> synth"""
    return module.split(".")[1]


def _import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports}; `from package import name` counts as importing the
    submodule `package.name` when there is one, else the package."""
    modules = _modules()

    def project_module(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parent + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            targets |= {t for t in map(project_module, names) if t and t != module}
        graph[module] = targets
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert _circles(_import_graph()) == []


def test_the_stages_never_import_each_other():
    graph = _import_graph()
    assert {_stage(m) for m in graph} == set(PACKAGES)
    assert {_stage(t) for m in graph if _stage(m) != "common" for t in graph[m]} >= {"common", "synth", "distill"}
    for stage, other in (("synth", "distill"), ("distill", "synth")):
        crossing = {m: sorted(t for t in targets if _stage(t) == other)
                    for m, targets in graph.items() if _stage(m) == stage}
        assert {m: t for m, t in crossing.items() if t} == {}


def test_common_holds_only_what_both_stages_share():
    """A module of common/ (a package of it, such as common/shards/, counts as one) is imported by both
    stages, or by another module of common/ (shared through it: the manifest's schema, remote shard
    folders); otherwise it belongs to the one stage that uses it."""
    graph = _import_graph()

    def unit(module: str) -> str:
        return ".".join(module.split(".")[:3])

    lonely = {}
    for common_unit in {unit(m) for m in graph if m.startswith("dfkd.common.")}:
        users = {unit(m) for m, targets in graph.items()
                 if unit(m) != common_unit and any(unit(t) == common_unit for t in targets)}
        stages = {_stage(u) for u in users if _stage(u) != "common"}
        if stages != {"synth", "distill"} and not any(u.startswith("dfkd.common.") for u in users):
            lonely[common_unit] = sorted(stages)
    assert lonely == {}


def test_a_manifest_is_read_without_torch(tmp_path):
    """The shard contract (and the input spec a manifest records) needs numpy and Pillow only: the writer
    processes and outside readers run it without torch."""
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch fails
from dfkd.common.shards import TeacherRecord, build_manifest, read_manifest, write_manifest
spec = {{"channels": 1, "size": 28, "mean": [0.5], "std": [0.25], "num_classes": 10}}
teacher = TeacherRecord("lenet5", "none", None, "0" * 64, spec)
write_manifest({str(tmp_path)!r}, build_manifest(teacher, method="noise", config={{}}, image_format="png",
                                                planned_samples=0, shard_size=1))
print(read_manifest({str(tmp_path)!r}, require_complete=False).input_spec)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "InputSpec(channels=1, size=28, mean=(0.5,), std=(0.25,), num_classes=10)" in done.stdout
