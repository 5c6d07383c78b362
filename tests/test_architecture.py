"""The package's structure (ARCHITECTURE.md): every module imports on its own, imports form no cycle,
each op's backends provide its declared launcher contract, and no op reaches into another's private names."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lpa_kernels"
OPS = {"perturb": "PerturbLaunchers", "pgd": "PGDLaunchers", "linear_perturb": "LinearPerturbLaunchers",
       "head_pgd": "HeadPGDLaunchers", "step_update": "StepLaunchers"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported_modules(path: Path, name: str) -> set[str]:
    """The ``lpa_kernels`` modules that ``path`` (module ``name``) imports anywhere, function bodies and
    ``import_module("...")`` calls included (a lazy import still ties the two modules together)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)  # importlib.import_module("lpa_kernels.x")
    return {m for m in found if m in MODULES and m != name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports. An import of an enclosing package (``from lpa_kernels import
    __version__``) is left out: Python initialises a package before any of its modules, so it orders nothing."""
    return {name: {m for m in _imported_modules(path, name) if not name.startswith(m + ".")}
            for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` in ``graph``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == 1:
                return path[path.index(succ):] + [succ]
            if succ not in state and (cycle := visit(succ)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_package_imports_have_no_cycle():
    graph = import_graph()
    assert "lpa_kernels._common" in graph["lpa_kernels.perturb.op"], "the import graph must see the ops' imports"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh interpreter (forked from one that has loaded only torch and
    triton, which keeps this fast): an import that works only after some other module fails here."""
    script = textwrap.dedent("""
        import importlib, os, sys, traceback
        import torch, triton  # third-party only: nothing of lpa_kernels is loaded before the fork
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            if os.waitpid(pid, 0)[1] != 0:
                failed.append(name)
        print("FAILED:", " ".join(failed))
        sys.exit(1 if failed else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script, *MODULES], capture_output=True, text=True, timeout=300,
                            cwd=PACKAGE.parent)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("op", OPS)
def test_both_backends_provide_the_declared_launcher_contract(op):
    """``<op>/backends.py`` declares the launchers once; ``triton_kernels`` and ``cuda_kernels`` define each
    with the contract's parameters, in order."""
    import importlib

    contract = getattr(importlib.import_module(f"lpa_kernels.{op}.backends"), OPS[op])
    methods = {name: f for name, f in vars(contract).items() if inspect.isfunction(f) and not name.startswith("_")}
    assert methods, f"{OPS[op]} declares no launcher"
    for backend in ("triton_kernels", "cuda_kernels"):
        module = importlib.import_module(f"lpa_kernels.{op}.{backend}")
        for name, declared in methods.items():
            launcher = getattr(module, name, None)
            assert callable(launcher), f"lpa_kernels.{op}.{backend} has no launcher {name}"
            wanted = list(inspect.signature(declared).parameters)[1:]  # without self
            assert list(inspect.signature(launcher).parameters) == wanted, f"{op}.{backend}.{name}"


def test_no_op_imports_another_ops_private_names():
    offences = []
    for name, path in MODULES.items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in OPS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lpa_kernels."):
                target = node.module.split(".")[1]
                private = [a.name for a in node.names if a.name.startswith("_")]
                if target in OPS and target != parts[1] and private:
                    offences.append(f"{name} imports {private} from {node.module}")
    assert not offences, offences
