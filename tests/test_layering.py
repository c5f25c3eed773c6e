"""The package's imports run one way, and the package tree is the layer table.

Each layer is a package of offload_moe (`ORDER`, bottom to top; packages in one tuple are peers that
may not import each other). Every module is read with `ast` (local and TYPE_CHECKING imports included:
a cycle hidden in a function is still a cycle) and the rules are checked; docs/architecture.md's table
must list the same packages in the same order and name every module in each."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "offload_moe"
DOCS = ROOT / "docs" / "architecture.md"

# Bottom to top. "" is the package's own __init__ (the public names: load, Model, ...).
ORDER = [("base",), ("kernels",), ("checkpoints",), ("model",), ("experts",), ("placement",), ("generation",),
         ("api",), ("tools",), ("",), ("bench", "tune", "server"), ("cli",)]
TOP_MODULES = {"__init__", "__main__"}  # the only modules outside a layer package
INTERFACE = "offload_moe.model.expert_interface"  # what the engine may see of the model, and the model of it


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def read_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = read_modules()


def package_of(module: str) -> str:
    """The layer package a module belongs to ("" for offload_moe/__init__.py, "__main__" for __main__)."""
    parts = module.split(".")
    if parts[1:] == ["__main__"]:
        return "cli"  # `python -m offload_moe` is the CLI
    return parts[1] if len(parts) > 1 else ""


def layer_of(module: str) -> int:
    pkg = package_of(module)
    for i, peers in enumerate(ORDER):
        if pkg in peers:
            return i
    raise AssertionError(f"{module}: package {pkg!r} is in no layer: add it to ORDER and docs/architecture.md")


def imports(name: str) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import in module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for a in node.names:
                sub = f"{source}.{a.name}"
                found.append((sub, "", node.lineno) if sub in MODULES else (source, a.name, node.lineno))
    return found


def internal_edges() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(m) if t in MODULES} for m in MODULES}


def where(m: str, line: int) -> str:
    return f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}"


def test_the_tree_is_the_layers():
    """Every module sits in a layer package, and every package is a layer."""
    loose = [p.name for p in PACKAGE.glob("*.py") if p.stem not in TOP_MODULES]
    assert not loose, f"modules outside a layer package: {loose}"
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    named = {pkg for peers in ORDER for pkg in peers if pkg}
    assert packages == named, f"packages not in ORDER: {sorted(packages - named)}; in ORDER, absent: {sorted(named - packages)}"


def test_no_import_cycles():
    edges = internal_edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if t == m:
                continue
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_imports_run_downwards_and_peers_stay_apart():
    bad = []
    for m in MODULES:
        for t, _, line in imports(m):
            if t not in MODULES or package_of(t) == package_of(m):
                continue
            if layer_of(t) > layer_of(m):
                bad.append(f"{where(m, line)}: {m} imports {t}, a layer above it")
            elif layer_of(t) == layer_of(m):
                bad.append(f"{where(m, line)}: {m} imports {t}, a peer package")
    assert not bad, "\n".join(bad)


def test_model_and_engine_meet_only_at_the_interface():
    """The model never imports the engine (it is above it); the engine sees of the model only the
    provider interface, never the transformer it serves."""
    bad = [f"{where(m, line)}: {m} imports {t}" for m in MODULES if package_of(m) == "experts"
           for t, _, line in imports(m) if package_of(t) == "model" and t in MODULES and t != INTERFACE]
    assert not bad, "\n".join(bad)


def test_only_the_cli_imports_rich_or_argparse():
    bad = [f"{m} imports {t}" for m in MODULES if package_of(m) != "cli"
           for t, _, _ in imports(m) if t.split(".")[0] in ("rich", "argparse")]
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = [f"{m} imports {t}.{n}" for m in MODULES for t, n, _ in imports(m)
           if t in MODULES and t != m and n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def doc_table() -> list[tuple[list[str], set[str]]]:
    """(packages, backticked names in the modules cell) per row of docs/architecture.md's layer table."""
    rows = []
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        packages = [p.strip("`/") for p in re.findall(r"`[^`]+`", cells[0])]
        packages = ["" if p == "offload_moe/__init__.py" else p for p in packages]
        rows.append((packages, set(re.findall(r"`([A-Za-z0-9_./]+)`", cells[1]))))
    return rows


def package_parts(pkg: str) -> set[str]:
    """What the docs must name of a package: its modules (stems) and subpackages (`name/`)."""
    d = PACKAGE / pkg
    parts = {p.stem for p in d.glob("*.py") if p.stem != "__init__"}
    parts |= {p.parent.name + "/" for p in d.glob("*/__init__.py")}
    return parts


def test_the_docs_table_is_the_tree():
    rows = doc_table()
    assert [tuple(p) for p, _ in rows] == ORDER, (
        f"docs/architecture.md's table lists {[tuple(p) for p, _ in rows]}, the code {ORDER}")
    for packages, named in rows:
        for pkg in packages:
            if not pkg:
                continue
            missing = package_parts(pkg) - named
            assert not missing, f"docs/architecture.md: the {pkg}/ row does not name {sorted(missing)}"
        known = {x.rstrip("/") for p in packages if p for x in package_parts(p)}
        elsewhere = {x.rstrip("/") for p in PACKAGE.glob("*/") if p.is_dir() for x in package_parts(p.name)} - known
        misplaced = {n.rstrip("/") for n in named} - set(packages) & elsewhere
        assert not misplaced, f"docs/architecture.md: the {packages} row names modules of other packages: {sorted(misplaced)}"


def test_the_checker_sees_a_bad_import(tmp_path, monkeypatch):
    """The rules above are not vacuous: an upward import, a peer import, a cycle and a private import
    are caught."""
    pkg = tmp_path / "offload_moe"
    for d in ("base", "api", "bench", "tune"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "base" / "errors.py").write_text("from ..api.loader import load\n")
    (pkg / "api" / "loader.py").write_text("from ..base.errors import _hidden\n")
    (pkg / "bench" / "run.py").write_text("from ..tune import search\n")
    (pkg / "tune" / "search.py").write_text("x = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {module_name(p): p for p in sorted(pkg.rglob("*.py"))})
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="a layer above it") as up:
        test_imports_run_downwards_and_peers_stay_apart()
    assert "a peer package" in str(up.value)
    with pytest.raises(AssertionError, match="_hidden"):
        test_no_private_names_across_modules()
