"""The code's shape: no import cycle between modules, no package reaching into another's private modules,
the README's layout table true to the tree, one version, and a core that needs neither scikit-learn nor
matplotlib (the ``sim`` extra)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("splitexport", "server", "device_runtime")

def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(name: str, *, in_functions: bool) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``), leaving out
    ``if TYPE_CHECKING:`` blocks and, unless ``in_functions``, the bodies of functions."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def resolve(module: str) -> str | None:
        parts = module.split(".")
        while parts and ".".join(parts) not in MODULES:
            parts.pop()
        return ".".join(parts) or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]))
                continue
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) and not in_functions:
                continue
            if isinstance(child, ast.Import):
                found.update(m for a in child.names if (m := resolve(a.name)))
            elif isinstance(child, ast.ImportFrom):
                base = ".".join(package[: len(package) - child.level + 1] + [child.module or ""]).strip(".") \
                    if child.level else child.module or ""
                for alias in child.names:
                    target = resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES else resolve(base)
                    if target:
                        found.add(target)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found - {name}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycle_at_import_time() -> None:
    graph = {m: imported(m, in_functions=False) for m in MODULES}
    assert "splitexport._bundle" in graph["splitexport"]  # the graph is built at all
    assert cycles(graph) == []


def test_no_import_cycle_through_imports_in_functions_either() -> None:
    graph = {m: imported(m, in_functions=True) for m in MODULES}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_lazy_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]


def test_no_package_imports_another_packages_private_module() -> None:
    def private(module: str) -> bool:
        return any(part.startswith("_") and part != "__init__" for part in module.split("."))

    bad = sorted(f"{m} imports {t}" for m in MODULES for t in imported(m, in_functions=True)
                 if t.split(".")[0] != m.split(".")[0] and private(t))
    assert bad == []


def layout_rows() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    table = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and (m := re.fullmatch(r"`([^`]+)`", cells[0])):
            rows[m.group(1)] = cells[1]
    return rows


def tree() -> list[str]:
    """The repository's files: tracked, or new and not ignored."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if (ROOT / f).exists()]


def test_readme_layout_table_matches_the_tree() -> None:
    rows = layout_rows()
    files = tree()
    dirs = {"/".join(f.split("/")[:i]) + "/" for f in files for i in range(1, f.count("/") + 1)}
    assert len(rows) >= 8, rows
    for path in rows:
        assert (ROOT / path).exists(), f"the layout table names {path}, which is not in the tree"
    top = {d for d in dirs if d.count("/") == 1 and not d.startswith(".")}
    subpackages = {str(p.parent.relative_to(ROOT)) + "/" for p in (ROOT / "splitexport").glob("*/__init__.py")}
    assert top | subpackages <= set(rows), f"no row for {sorted((top | subpackages) - set(rows))}"
    # the files and folders a row names in backticks (not URL paths such as `/app/`) exist below it
    for path, what in rows.items():
        if not path.endswith("/"):
            continue
        for name in re.findall(r"`(\w[\w./-]*\.(?:py|mjs|js)|\w[\w/-]*/)`", what):
            if "/" in name.rstrip("/"):  # a path from the root
                assert (ROOT / name).exists(), f"the row {path} names {name}, which is not in the tree"
                continue
            hits = [f for f in files if f.startswith(path) and (f.endswith("/" + name) or f"/{name}" in f)]
            assert hits, f"the row {path} names {name}, which is not below it"


def test_version_comes_from_pyproject() -> None:
    import splitexport
    from splitexport._version import package_version

    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert splitexport.__version__ == package_version() == expected


def test_version_of_a_source_checkout_without_install(tmp_path: Path) -> None:
    """No distribution installed: pyproject.toml beside the package answers."""
    code = ("import importlib.metadata as m\n"
            "installed = m.version\n"
            "def version(name):\n"
            "    if name == 'splitexport':\n"
            "        raise m.PackageNotFoundError(name)\n"
            "    return installed(name)\n"
            "m.version = version\n"
            "import splitexport; print(splitexport.__version__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip()
    assert out == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_root_api_is_the_core() -> None:
    import splitexport

    assert len(splitexport.__all__) == len(set(splitexport.__all__))
    assert [n for n in splitexport.__all__ if not hasattr(splitexport, n)] == []
    for harness in ("simulate_clients", "ServerLink", "MultiClientResult", "c3_score", "partition_indices"):
        assert harness not in splitexport.__all__


def test_the_core_runs_without_the_sim_extra(tmp_path: Path) -> None:
    """Importing every package and cutting a model work with scikit-learn and matplotlib missing; the digits
    dataset and the plots then fail with one line naming the extra."""
    code = f"""
import sys
sys.modules["sklearn"] = sys.modules["matplotlib"] = None  # importing them raises ImportError
import torch
import device_runtime, server, splitexport, splitexport.export, splitexport.strategies, splitexport._cli
from splitexport import OptimizerSpec, SourceSpec, SplitExportError, load_bundle, partition, write_bundle
from splitexport.models import mlp
from splitexport.plots import pyplot
part = partition(mlp(), ["relu1"], torch.zeros(2, 1, 8, 8))
write_bundle(part, {str(tmp_path / "b")!r}, source=SourceSpec(file_name="m.pt", sha256="0" * 64, kind="state_dict"),
             optimizer=OptimizerSpec())
load_bundle({str(tmp_path / "b")!r})
for needs_the_extra in (splitexport.load_dataset, pyplot):
    try:
        needs_the_extra()
    except SplitExportError as exc:
        print(exc)
"""
    res = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.splitlines() == ["the digits dataset needs scikit-learn: pip install 'splitexport[sim]'",
                                       "plots need matplotlib: pip install 'splitexport[sim]'"]
