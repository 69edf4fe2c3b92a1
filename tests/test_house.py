"""The house: one import namespace (`moekit`), rooms that import only the rooms below them, no import cycles
between modules (imports inside functions included), and a test module named after every source module.

    moekit.llama            (nothing of ours)          folder llama/
    moekit.kernels          (nothing of ours)          folder kernels/
    moekit.moe              llama, kernels             folder moe/: the MoE model only
    moekit.moe.accounting   llama, moe
    moekit.moe.train        llama, moe, moe.accounting
    moekit.moe.bench        llama, kernels, moe, moe.accounting
    moekit.moe.eval         llama, moe, moe.train
    moekit.upcycle          llama, moe                 folder upcycle/
    moekit (cli, args)      everything; nothing imports it
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"llama": "moekit.llama", "kernels": "moekit.kernels", "moe": "moekit.moe", "upcycle": "moekit.upcycle",
           "moekit": "moekit"}  # repository folder -> import name (pyproject's package-dir)
BARE = {"llama", "kernels", "moe", "upcycle"}  # folder names that are other projects' packages on PyPI
MAY_IMPORT = {
    "moekit.llama": set(),
    "moekit.kernels": set(),
    "moekit.moe": {"llama", "kernels"},
    "moekit.moe.accounting": {"llama", "moe"},
    "moekit.moe.train": {"llama", "moe", "moe.accounting"},
    "moekit.moe.bench": {"llama", "kernels", "moe", "moe.accounting"},
    "moekit.moe.eval": {"llama", "moe", "moe.train"},
    "moekit.upcycle": {"llama", "moe"},
    "moekit": {"llama", "kernels", "moe", "moe.accounting", "moe.train", "moe.bench", "moe.eval", "upcycle"},
}
MAY_IMPORT = {room: {f"moekit.{r}" for r in rooms} for room, rooms in MAY_IMPORT.items()}
NAMESPACE = "moekit"  # the root package, run by every import of the namespace: it holds only `main`


def room(module: str) -> str | None:
    """The room a dotted module name belongs to (the longest room prefix), or None if it is not ours."""
    rooms = [r for r in MAY_IMPORT if module == r or module.startswith(r + ".")]
    return max(rooms, key=len) if rooms else None


def imported_modules(module: str, source: str, is_package: bool = False) -> list[str]:
    """Every module `source` (the text of `module`) imports, anywhere in it, relative imports resolved; for
    `from P import name` both P and P.name (which may be a submodule)."""
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
            out += [base, *(f"{base}.{a.name}" for a in node.names)]
    return [m for m in out if m != NAMESPACE]


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """'A imports B' for every import of `module` that its room may not make, and every bare import of a folder
    name (`import llama` finds another project's package once moekit is installed)."""
    mine = room(module)
    found = []
    for target in imported_modules(module, source, is_package):
        if target.split(".")[0] in BARE:
            found.append(f"{module} imports {target}: ours is moekit.{target}")
            continue
        theirs = room(target)
        if theirs is None or theirs == mine:
            continue
        if theirs not in MAY_IMPORT[mine]:
            found.append(f"{module} imports {target} (room {mine} may import {sorted(MAY_IMPORT[mine]) or 'nothing'})")
    return found


def cycles(sources: dict[str, tuple[str, bool]]) -> list[list[str]]:
    """The import cycles among `sources` (module -> (text, is_package)): each a list of modules whose last imports
    the first. Imports inside functions count: they only move the cycle to run time. A module's own packages
    are left out: they are always imported before it."""
    graph = {m: sorted({t for t in imported_modules(m, text, pkg) if t in sources and not f"{m}.".startswith(f"{t}.")})
             for m, (text, pkg) in sources.items()}
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                found.append(path[path.index(t):] + [m])
            elif t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found


def source_modules():
    """(import name, path, is_package) of every module the wheel installs."""
    for folder, name in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            is_package = rel.name == "__init__"
            parts = rel.parts[:-1] if is_package else rel.parts
            yield ".".join((name, *parts)), path, is_package


def test_every_room_imports_only_the_rooms_below_it():
    found = [v for name, path, pkg in source_modules() for v in violations(name, path.read_text(), pkg)]
    assert not found, "\n".join(found)
    assert len(list(source_modules())) > 40  # the walk saw the tree


def test_no_import_cycles():
    sources = {name: (path.read_text(), pkg) for name, path, pkg in source_modules()}
    found = cycles(sources)
    assert not found, "\n".join(" -> ".join(c + [c[0]]) for c in found)


def test_tests_and_scripts_import_the_namespace():
    found = [f"{path.relative_to(ROOT)} imports {t}" for d in ("tests", "scripts") for path in (ROOT / d).glob("*.py")
             for t in imported_modules("x", path.read_text()) if t.split(".")[0] in BARE]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module, source", [
    ("moekit.llama.model", "from moekit.moe.config import MoEConfig"),  # the floor imports a room above it
    ("moekit.kernels.dispatch", "import moekit.llama.errors"),
    ("moekit.moe.layer", "from moekit.upcycle import recipes"),  # the model imports a job built on it
    ("moekit.moe.model", "from .train import loop"),  # relative import into a room of its own
    ("moekit.moe.accounting.sources", "from ..train.loop import train"),
    ("moekit.upcycle.convert", "from moekit.cli import main"),  # nothing imports the command line
    ("moekit.upcycle.convert", "from moekit import cli"),
    ("moekit.moe.bench.layer", "def f():\n    from moekit.upcycle.convert import upcycle"),  # inside a function
    ("moekit.moe.layer", "from llama.model import MLP"),  # a bare folder name: another project's `llama`
    ("moekit.cli", "import kernels"),
])
def test_an_upward_import_is_caught(module, source):
    assert violations(module, source), f"{module}: {source!r} should be refused"


@pytest.mark.parametrize("module, source", [
    ("moekit.moe.layer", "from moekit import kernels\nfrom moekit.llama.model import MLP\nfrom .router import Router"),
    ("moekit.moe.train.loop", "from moekit.moe.accounting import count_params\nimport torch"),
    ("moekit.cli", "from moekit.upcycle.convert import upcycle"),
])
def test_downward_imports_pass(module, source):
    assert violations(module, source) == []


@pytest.mark.parametrize("sources, cycle", [
    ({"moekit.upcycle.a": "from moekit.upcycle.b import f", "moekit.upcycle.b": "from moekit.upcycle.a import g"},
     ["moekit.upcycle.a", "moekit.upcycle.b"]),
    ({"moekit.upcycle.a": "from . import b",  # relative, and the way back inside a function
      "moekit.upcycle.b": "def f():\n    from .c import g", "moekit.upcycle.c": "import moekit.upcycle.a"},
     ["moekit.upcycle.a", "moekit.upcycle.b", "moekit.upcycle.c"]),
])
def test_a_cycle_is_caught(sources, cycle):
    found = cycles({m: (s, False) for m, s in sources.items()})
    assert [sorted(c) for c in found] == [cycle]


def test_a_chain_is_not_a_cycle():
    chain = {"moekit.upcycle.a": "from moekit.upcycle import b", "moekit.upcycle.b": "from . import c",
             "moekit.upcycle.c": "import torch", "moekit.upcycle": "from moekit.llama._lazy import lazy_exports"}
    assert cycles({m: (s, m == "moekit.upcycle") for m, s in chain.items()}) == []


# Modules tested in a test module named after another (the name says where).
TESTED_WITH = {
    "moekit.llama._lazy": "test_moekit_cli.py",  # --help imports no torch
    "moekit.llama.errors": "test_moekit_cli.py",
    "moekit.kernels.reference": "test_kernels_triton.py",  # the oracle of every kernel
    "moekit.kernels.triton_gemm": "test_kernels_triton.py",
    "moekit.kernels.triton_ops": "test_kernels_triton.py",
    "moekit.kernels.triton_routing": "test_kernels_triton.py",
    "moekit.kernels.triton_decode": "test_kernels_triton.py",
    "moekit.kernels.megablocks": "test_moe_bench_layer.py",
    "moekit.moe.accounting.report": "test_moe_accounting_cost.py",
    "moekit.moe.bench.options": "test_moe_bench_layer.py",
    "moekit.moe.bench.timing": "test_moe_bench_layer.py",
    "moekit.moe.train.options": "test_moe_train_loop.py",
    "moekit.moe.eval.options": "test_moe_eval_run.py",
    "moekit.moe.train.runs": "test_moe_train_plot.py",
}


def test_every_module_has_a_test_module_named_after_it():
    """tests/test_<name without moekit.>.py, e.g. moekit.moe.train.loop -> tests/test_moe_train_loop.py."""
    tests = {p.name for p in (ROOT / "tests").glob("test_*.py")}
    missing = []
    for name, _, is_package in source_modules():
        if is_package or name.endswith("__main__"):
            continue
        short = name if room(name) == "moekit" else name.removeprefix("moekit.")
        stem = "test_" + short.replace(".", "_").replace("__", "_").strip("_")
        if name in TESTED_WITH:
            assert TESTED_WITH[name] in tests, name
        elif not any(t == f"{stem}.py" or t.startswith(stem + "_") for t in tests):
            missing.append(f"{name}: no tests/{stem}.py")
    assert not missing, "\n".join(missing)


# Functions longer than a screen, kept until they are split; no new ones.
LONG_FUNCTIONS = {"moekit.moe.accounting.sources.count_checkpoint", "moekit.moe.bench.layer._run_size",
                  "moekit.moe.bench.train.bench_train", "moekit.kernels.triton_gemm._grouped_mm_kernel"}


def test_no_function_is_longer_than_60_lines():
    """The training loop above all (moe/train/loop.py): a top-level loop of named phases, each readable at once."""
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for name, path, _ in source_modules()
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
            and f"{name}.{node.name}" not in LONG_FUNCTIONS]
    assert not long, "\n".join(long)
