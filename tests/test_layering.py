"""The package's imports run one way (docs/architecture.md): read every module with `ast`, build
the import graph (local and TYPE_CHECKING imports included: a cycle hidden in a function is still a
cycle), and check the layering rules. Each rule is a test that fails by naming the import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "offload_moe"

# Bottom to top. A module may import its own layer or any layer below it, never one above.
LAYERS = [
    ("base", ["offload_moe.errors", "offload_moe.runtime", "offload_moe.threads", "offload_moe.timing", "offload_moe.quant", "offload_moe.owned_paths",
              "offload_moe.user_files", "offload_moe.validate", "offload_moe.safetensors_header",
              "offload_moe.safetensors_map"]),
    ("family", ["offload_moe.arch", "offload_moe.config", "offload_moe.checkpoint", "offload_moe.sanity",
                "offload_moe.budget", "offload_moe.gguf", "offload_moe.hub"]),
    ("model", ["offload_moe.experts.interface", "offload_moe.decode_cpu", "offload_moe.attention", "offload_moe.linear_attention",
               "offload_moe.kv_slots",
               "offload_moe.model"]),
    ("engine", ["offload_moe.experts", "offload_moe.cpu"]),
    ("planning", ["offload_moe.profiles", "offload_moe.planner", "offload_moe.options"]),
    ("generation", ["offload_moe.generate", "offload_moe.batch", "offload_moe.generation_config", "offload_moe.penalties",
                    "offload_moe.text", "offload_moe.chat_template", "offload_moe.template_sandbox", "offload_moe.nonfinite",
                    "offload_moe.constrain", "offload_moe.generation_options"]),
    ("api", ["offload_moe.api", "offload_moe.model_settings", "offload_moe.loader", "offload_moe.chat_session", "offload_moe.sources"]),
    ("tools", ["offload_moe.bench", "offload_moe.tune", "offload_moe.tools", "offload_moe.synthetic",
               "offload_moe.server", "offload_moe"]),
    ("cli", ["offload_moe.cli", "offload_moe.__main__"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


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


def layer_of(module: str) -> int:
    best, index = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > len(best):
                best, index = p, i
    assert index is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return index


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


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


def test_imports_run_downwards():
    bad = []
    for m in MODULES:
        for t, _, line in imports(m):
            if t in MODULES and layer_of(t) > layer_of(m):
                bad.append(f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {m} ({LAYERS[layer_of(m)][0]}) "
                           f"imports {t} ({LAYERS[layer_of(t)][0]})")
    assert not bad, "\n".join(bad)


def test_model_sees_the_engine_only_through_the_interface():
    bad = [f"{m} imports {t}" for m in MODULES if layer_of(m) <= layer_of("offload_moe.model")
           for t, _, _ in imports(m)
           if t.startswith("offload_moe.experts") and t != "offload_moe.experts.interface"]
    assert not bad, "\n".join(bad)


def test_engine_imports_nothing_above_it():
    above = ("offload_moe.model", "offload_moe.generate", "offload_moe.api", "offload_moe.loader",
             "offload_moe.cli", "offload_moe.bench", "offload_moe.tune", "offload_moe.planner")
    bad = [f"{m} imports {t}" for m in MODULES if m.startswith(("offload_moe.experts", "offload_moe.cpu"))
           for t, _, _ in imports(m) if t == "offload_moe" or t.startswith(above)]
    assert not bad, "\n".join(bad)


def test_only_the_cli_imports_rich_or_argparse():
    bad = [f"{m} imports {t}" for m in MODULES if not m.startswith("offload_moe.cli")
           for t, _, _ in imports(m) if t.split(".")[0] in ("rich", "argparse")]
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = [f"{m} imports {t}.{n}" for m in MODULES for t, n, _ in imports(m)
           if t in MODULES and t != m and n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_bad_import(tmp_path):
    """The rules above are not vacuous: an upward import, a cycle and a private import are caught."""
    a, b = tmp_path / "offload_moe" / "config.py", tmp_path / "offload_moe" / "errors.py"
    a.parent.mkdir()
    a.write_text("from .loader import load\nfrom .errors import _hidden\n")
    b.write_text("from .config import ModelConfig\n")
    (tmp_path / "offload_moe" / "loader.py").write_text("from .config import x\n")
    global PACKAGE, MODULES
    saved = PACKAGE, MODULES
    try:
        PACKAGE = tmp_path / "offload_moe"
        MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
        for test in (test_no_import_cycles, test_imports_run_downwards, test_no_private_names_across_modules):
            with pytest.raises(pytest.fail.Exception if test is test_no_import_cycles else AssertionError):
                test()
    finally:
        PACKAGE, MODULES = saved
