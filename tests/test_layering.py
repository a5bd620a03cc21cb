"""The package's layering (ARCH.md, "What each package owns"): a stage imports only the stages below it and
``core``; nothing imports upward; no import circle, lazy (in-function) and TYPE_CHECKING imports included;
``core`` never imports torch or Megatron. Read from the source with ``ast``, so a later change cannot
quietly undo it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "flanpipe"

# Lowest first. Top-level modules (cli, cli_audit) and the benchmarks stand above every stage.
LAYERS = ["core", "data", "model", "train", "eval", "report", "plan"]
TOP = len(LAYERS)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself: its __init__ holds only the version
        return -1
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else TOP


def _imports(module: str) -> set[str]:
    """Every flanpipe module ``module`` imports, wherever the import statement stands."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            # "flanpipe.data.templates.load_templates" -> the longest prefix that is a module
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and name != "flanpipe":
                found.add(name)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_stage_package_says_what_it_owns_and_may_import():
    for layer in LAYERS:
        init = PKG / layer / "__init__.py"
        assert init.exists(), f"flanpipe/{layer}/ has no __init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "may import" in doc, f"flanpipe/{layer}/__init__.py: the docstring must say what the package may import"


def test_no_module_outside_the_stage_packages_but_the_cli():
    loose = sorted(m for m in MODULES if m.count(".") == 1 and m.split(".")[1] not in {*LAYERS, "bench"})
    assert loose == ["flanpipe.cli", "flanpipe.cli_audit"]


def test_no_import_runs_upward():
    upward = [
        f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
        for a, deps in GRAPH.items()
        for b in deps
        if _layer(b) > _layer(a)
    ]
    assert upward == []


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    circles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                circles.append([*stack[stack.index(d) :], d])
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_the_checker_sees_lazy_and_type_checking_imports(tmp_path):
    """The graph is only as good as its reader: an in-function import and a TYPE_CHECKING import count."""
    assert "flanpipe.train.loop" in GRAPH["flanpipe.eval.inference"]  # imported inside a function there
    assert "flanpipe.plan.runs" in GRAPH["flanpipe.plan.checks"]  # imported under TYPE_CHECKING there


def test_core_never_imports_torch_or_megatron():
    heavy = ("torch", "megatron")
    for m, path in MODULES.items():
        if _layer(m) != 0:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            bad = [n for n in names if n.split(".")[0] in heavy]
            assert not bad, f"{path}: core imports {bad}"


@pytest.mark.parametrize("layer", ["core", "plan"])
def test_importing_core_and_plan_loads_no_torch(layer):
    """Planning reads core and plan: importing every module of them leaves torch unloaded."""
    mods = sorted(m for m in MODULES if m.startswith(f"flanpipe.{layer}"))
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in mods)
        + "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing flanpipe.{layer} loaded {out}"
