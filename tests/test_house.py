"""The house: rooms import only the rooms below them, and every source module has a test module named after it.

    llama            (nothing of ours)
    kernels          (nothing of ours)
    moe              llama, kernels                  the MoE model only
    moe.accounting   llama, moe
    moe.train        llama, moe, moe.accounting
    moe.bench        llama, kernels, moe, moe.accounting
    upcycle          llama, moe
    moekit           everything; nothing imports it but launchers' __main__ modules
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("llama", "kernels", "moe", "upcycle", "moekit")
MAY_IMPORT = {
    "llama": set(),
    "kernels": set(),
    "moe": {"llama", "kernels"},
    "moe.accounting": {"llama", "moe"},
    "moe.train": {"llama", "moe", "moe.accounting"},
    "moe.bench": {"llama", "kernels", "moe", "moe.accounting"},
    "upcycle": {"llama", "moe"},
    "moekit": {"llama", "kernels", "moe", "moe.accounting", "moe.train", "moe.bench", "upcycle"},
}
LAUNCHERS = {"moe.train.__main__"}  # `accelerate launch -m moe.train`: an entry point into the command line


def room(module: str) -> str | None:
    """The room a dotted module name belongs to (the longest room prefix), or None if it is not ours."""
    rooms = [r for r in MAY_IMPORT if module == r or module.startswith(r + ".")]
    return max(rooms, key=len) if rooms else None


def imported_modules(module: str, source: str, is_package: bool = False) -> list[str]:
    """Every module `source` (the text of `module`) imports, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            out += [f"{base}.{a.name}" for a in node.names] if node.module is None else [base]
    return out


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """'A imports B' for every import of `module` that its room may not make."""
    mine = room(module)
    found = []
    for target in imported_modules(module, source, is_package):
        theirs = room(target)
        if theirs is None or theirs == mine:
            continue
        if theirs == "moekit" and module in LAUNCHERS:
            continue
        if theirs not in MAY_IMPORT[mine]:
            found.append(f"{module} imports {target} (room {mine} may import {sorted(MAY_IMPORT[mine]) or 'nothing'})")
    return found


def source_modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            is_package = rel.name == "__init__"
            name = ".".join(rel.parts[:-1] if is_package else rel.parts)
            yield name, path, is_package


def test_every_room_imports_only_the_rooms_below_it():
    found = [v for name, path, pkg in source_modules() for v in violations(name, path.read_text(), pkg)]
    assert not found, "\n".join(found)
    assert len(list(source_modules())) > 40  # the walk saw the tree


@pytest.mark.parametrize("module, source", [
    ("llama.model", "from moe.config import MoEConfig"),  # the floor imports a room above it
    ("kernels.dispatch", "import llama.errors"),
    ("moe.layer", "from upcycle import recipes"),  # the model imports a job built on it
    ("moe.model", "from .train import loop"),  # relative import into a room of its own
    ("moe.accounting.sources", "from ..train.loop import train"),
    ("upcycle.convert", "from moekit.cli import main"),  # nothing imports the command line
    ("moe.bench.layer", "from upcycle.convert import upcycle"),
])
def test_an_upward_import_is_caught(module, source):
    assert violations(module, source), f"{module}: {source!r} should be refused"


@pytest.mark.parametrize("module, source", [
    ("moe.layer", "import kernels\nfrom llama.model import MLP\nfrom .router import Router"),
    ("moe.train.loop", "from moe.accounting import count_params\nimport torch"),
    ("moekit.cli", "from upcycle.convert import upcycle"),
    ("moe.train.__main__", "from moekit.cli import main"),
])
def test_downward_imports_pass(module, source):
    assert violations(module, source) == []


# Modules tested in a test module named after another (the name says where).
TESTED_WITH = {
    "llama._lazy": "test_moekit_cli.py",  # --help imports no torch
    "llama.errors": "test_moekit_cli.py",
    "kernels.reference": "test_kernels_triton.py",  # the oracle of every kernel
    "kernels.triton_gemm": "test_kernels_triton.py",
    "kernels.triton_ops": "test_kernels_triton.py",
    "kernels.triton_routing": "test_kernels_triton.py",
    "kernels.triton_decode": "test_kernels_triton.py",
    "kernels.megablocks": "test_moe_bench_layer.py",
    "moe.accounting.report": "test_moe_accounting_cost.py",
    "moe.bench.options": "test_moe_bench_layer.py",
    "moe.bench.timing": "test_moe_bench_layer.py",
    "moe.train.options": "test_moe_train_loop.py",
}


def test_every_module_has_a_test_module_named_after_it():
    tests = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    missing = []
    for name, _, is_package in source_modules():
        if is_package or name.endswith("__main__"):
            continue
        stem = "test_" + name.replace(".", "_").replace("__", "_").strip("_")
        if name in TESTED_WITH:
            assert TESTED_WITH[name] in tests, name
        elif not any(t == f"{stem}.py" or t.startswith(stem + "_") for t in tests):
            missing.append(f"{name}: no tests/{stem}.py")
    assert not missing, "\n".join(missing)
