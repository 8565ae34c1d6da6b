"""The engine's layering: no import cycle, one op vocabulary.

Each engine module imports only modules below it (``errors`` and ``graph`` at
the bottom, ``ops`` right above, ``quantizer`` near the top), so any module
can be imported first, and nothing dodges a cycle with a function-local
import. Every op set of the engine is derived from the op registry of
:mod:`quantbench.engine.ops`.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import fx

from quantbench.engine import ops
from quantbench.engine.graph import op_name
from quantbench.engine.passes import qat_bn
from quantbench.registry import UnknownNameError

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "quantbench" / "engine"
PACKAGE = "quantbench.engine"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ENGINE.rglob("*.py"))}
QUANTIZER = f"{PACKAGE}.quantizer"
ABOVE_QUANTIZER = {PACKAGE, f"{PACKAGE}.check"}
"""The only engine modules that may import the quantizer."""


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported engine module, line, at module level) for every import in ``module``.

    ``from quantbench.engine import x`` counts as an import of the submodule
    ``x`` when there is one. Imports under ``if TYPE_CHECKING:`` never run and
    are left out.
    """
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, path.name == "__init__.py")
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            names = subs or [base]
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                out.append((name, node.lineno, top))
        inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, True)
    return out


def test_engine_modules_are_found():
    for name in ("errors", "graph", "ops", "targets", "passes.align", "passes.freeze", "quantizer"):
        assert f"{PACKAGE}.{name}" in MODULES
    assert f"{PACKAGE}.hardware" not in MODULES and f"{PACKAGE}.passes.hardware" not in MODULES


#: The deliberate deferred imports, each to keep torch out of a config check (the CLI composes configs
#: with the engine's spec in well under a second): the package facade loads its names on first use,
#: and the spec asks the observer registry (torch) only when a spec is built.
LAZY = {(PACKAGE, f"{PACKAGE}.capture"), (f"{PACKAGE}.spec", f"{PACKAGE}.observers")}


def test_no_function_local_engine_imports():
    local = [f"{m}:{line} imports {name}" for m in MODULES for name, line, top in _imports(m)
             if not top and (m, name) not in LAZY]
    assert local == []


def test_only_the_top_layer_imports_the_quantizer():
    importers = {m for m in MODULES for name, _, _ in _imports(m) if name == QUANTIZER}
    assert importers <= ABOVE_QUANTIZER, importers - ABOVE_QUANTIZER
    assert (f"{PACKAGE}.passes.freeze" in {name for name, _, top in _imports(QUANTIZER) if top})


def test_bottom_layers_import_nothing_above_them():
    deps = {m: {name for name, _, _ in _imports(m)} for m in MODULES}
    assert deps[f"{PACKAGE}.errors"] == set()
    assert deps[f"{PACKAGE}.graph"] == set()
    assert deps[f"{PACKAGE}.ops"] == {f"{PACKAGE}.graph"}


def test_the_import_graph_is_acyclic():
    deps = {m: {n for n, _, _ in _imports(m) if n in MODULES and n != m} for m in MODULES}
    # Importing a submodule runs its parent package first; the root __init__ is the public
    # facade and is left out (it imports everything), as is each module's own package.
    for m in deps:
        deps[m].discard(PACKAGE)
        deps[m] -= {p for p in MODULES if m.startswith(p + ".")}
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, "import cycle: " + " -> ".join([*path, m])
        state[m] = 1
        for d in sorted(deps[m]):
            visit(d, [*path, m])
        state[m] = 2
        order.append(m)

    for m in sorted(deps):
        visit(m, [])
    assert len(order) == len(MODULES)


_IMPORT_EACH_FIRST = r"""
import importlib, importlib.util, json, sys
import torch  # noqa: F401  (third-party modules stay loaded; only the engine is imported afresh)
import quantbench

PACKAGE = "quantbench.engine"
failures = []
for first in json.loads(sys.argv[1]):
    for key in [k for k in sys.modules if k == PACKAGE or k.startswith(PACKAGE + ".")]:
        del sys.modules[key]
    if first != PACKAGE:
        # The package without running its __init__ (which imports everything in its own order),
        # so that `first` really is the first engine module to run.
        sys.modules[PACKAGE] = importlib.util.module_from_spec(importlib.util.find_spec(PACKAGE))
    try:
        importlib.import_module(first)
    except Exception as exc:  # an import cycle shows up as an ImportError or a NameError
        failures.append(f"{first}: {type(exc).__name__}: {exc}")
print(json.dumps(failures))
"""


def test_every_engine_module_imports_first_in_a_fresh_interpreter():
    order = [f"{PACKAGE}.passes.freeze", f"{PACKAGE}.targets", f"{PACKAGE}.passes.align", f"{PACKAGE}.spec",
             f"{PACKAGE}.observers"]
    order += [m for m in MODULES if m not in order and m != PACKAGE] + [PACKAGE]
    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST, json.dumps(order)], capture_output=True,
                         text=True, check=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# -- one op vocabulary -----------------------------------------------------------------------------


def _literal_op_lists(path: Path) -> list[str]:
    """Set / list / tuple literals of two or more strings that are registered op names (``__all__`` aside)."""
    known = set(ops.OP_KINDS)
    tree = ast.parse(path.read_text())
    exports = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Set, ast.List, ast.Tuple)) and id(node) not in exports:
            values = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            hits = [v for v in values if v in known]
            if len(hits) >= 2:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {hits}")
    return found


def test_no_second_literal_list_of_registered_ops():
    found = [hit for m, path in MODULES.items() if m != f"{PACKAGE}.ops" for hit in _literal_op_lists(path)]
    assert found == []


@pytest.mark.parametrize("tag, kind", [("relu_like", "activation"), ("sigmoid_like", "activation"),
                                       ("swish_like", "activation"), ("conv", "weighted"),
                                       ("integer_kernel", "weighted"), ("avg_pool", "pool")])
def test_op_sets_are_derived_from_the_registry(tag, kind):
    members = ops.ops_tagged(tag)
    assert members and members <= ops.ops_of_kind(kind)
    for name in members:
        assert ops.kind_of(name) == kind and tag in ops.op_tags(name)


def test_the_vocabulary_holds_what_the_passes_rely_on():
    assert ops.ops_tagged("relu_like") == {"relu", "relu6", "hardtanh"}
    assert ops.ops_tagged("integer_kernel") == {"conv1d", "conv2d", "conv3d", "linear"}
    assert ops.ops_tagged("conv") == ops.ops_of_kind("weighted") - {"linear"}
    assert ops.ops_of_kind("dropout") >= {"dropout", "feature_dropout", "alpha_dropout"}
    # qat_bn's call_function targets are registered by their function names.
    assert qat_bn.QAT_BN_OPS == {f.__name__ for f in (qat_bn.bn_fold_weight, qat_bn.bn_fold_bias,
                                                       qat_bn.bn_qat_output)}
    assert set(qat_bn.BATCH_STATS_ARG) - {"batch_norm"} <= qat_bn.QAT_BN_OPS
    assert ops.OP_TYPES == tuple(sorted(ops.OP_KINDS))


def test_unknown_kinds_and_tags_raise():
    with pytest.raises(UnknownNameError, match="did you mean relu_like"):
        ops.ops_tagged("relu_lik")
    with pytest.raises(UnknownNameError, match="op kind"):
        ops.ops_of_kind("nope")
    assert ops.kind_of("cumsum") is None


def test_op_kind_reads_call_function_nodes():
    graph = fx.Graph()
    x = graph.placeholder("x")
    relu = graph.call_function(torch.ops.aten.relu.default, (x,))
    assert op_name(relu) == "relu" and ops.op_kind(relu) == "activation"
    assert ops.op_kind(x) is None
