"""The import graph is one-way: ``report -> harness -> training -> engine`` and ``tasks -> training -> engine``.

Checked on the sources (every ``import``, function-local ones included) and
in a fresh interpreter (what importing a layer actually loads):

* the engine is a library by itself: no harness, training, task or tracking imports;
* the training layer imports neither Hydra nor MLflow (nor matplotlib);
* tasks import the engine and the training layer, never the harness, and
  never another task;
* the harness never imports a task (it reaches them through ``_target_``);
* the leaf modules (errors, registry, progress, quiet, lazy, compat) import no other layer.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Leaf modules every layer may import: they import nothing else of the project.
LEAVES = ("quantbench.errors", "quantbench.registry", "quantbench.progress", "quantbench.quiet", "quantbench.lazy", "quantbench.compat")

#: layer -> what its modules may import (besides themselves, the leaves and the ``quantbench`` root package).
ALLOWED = {
    "quantbench.engine": (),
    "quantbench.training": ("quantbench.engine",),
    "quantbench.peers": ("quantbench.engine",),
    "quantbench.harness": ("quantbench.training", "quantbench.engine", "quantbench.peers"),
    "quantbench.report": ("quantbench.harness", "quantbench.training", "quantbench.engine"),
    "quantbench.bench": ("quantbench.engine", "tasks"),  # tasks' models, to benchmark the detector
    "quantbench.cli": ("quantbench.harness", "quantbench.report", "quantbench.training", "quantbench.engine"),
    "tasks": ("quantbench.training", "quantbench.engine"),
}

#: Third-party packages a layer must not import.
FORBIDDEN_PACKAGES = {
    "quantbench.engine": {"hydra", "omegaconf", "mlflow", "pandas", "timm", "pycocotools", "matplotlib"},
    "quantbench.training": {"hydra", "omegaconf", "mlflow", "pandas", "matplotlib"},
    # an isolated engine's worker imports the peers package with only torch and its toolkit installed
    "quantbench.peers": {"hydra", "omegaconf", "mlflow", "pandas", "matplotlib", "timm", "pycocotools"},
    "tasks": {"hydra", "omegaconf", "mlflow", "pandas", "matplotlib"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in ``path``, relative imports resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def _layer(module: str) -> str | None:
    if module == "quantbench" or any(module == leaf or module.startswith(leaf + ".") for leaf in LEAVES):
        return "leaf"
    for layer in ALLOWED:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def _project_modules() -> list[Path]:
    return sorted([*(ROOT / "quantbench").rglob("*.py"), *(ROOT / "tasks").rglob("*.py")])


def _violations() -> list[str]:
    bad = []
    for path in _project_modules():
        module = _module_name(path)
        layer = _layer(module)
        for target, names, line in _imports(path):
            where = f"{path.relative_to(ROOT)}:{line}: {module} imports {target}"
            top = target.split(".")[0]
            if layer in FORBIDDEN_PACKAGES and top in FORBIDDEN_PACKAGES[layer]:
                bad.append(f"{where} (the {layer} layer must not use {top})")
                continue
            if top not in ("quantbench", "tasks"):
                continue
            to = _layer(target)
            if to == "leaf" or to == layer:
                if layer == "tasks" and to == "tasks" and target.split(".")[:2] != module.split(".")[:2] \
                        and target != "tasks":
                    bad.append(f"{where} (a task imports another task)")
                continue
            if layer == "leaf":
                bad.append(f"{where} (a leaf module imports a layer)")
            elif to not in ALLOWED.get(layer, ()):
                bad.append(f"{where} ({layer} may import only {', '.join(ALLOWED.get(layer, ())) or 'itself'})")
            elif any(n.startswith("_") for n in names):
                bad.append(f"{where}: private names {[n for n in names if n.startswith('_')]}")
    return bad


def test_every_module_belongs_to_a_layer():
    assert [m for m in map(_module_name, _project_modules()) if _layer(m) is None] == []


def test_the_import_graph_is_one_way():
    assert _violations() == []


def test_the_checker_catches_a_wrong_way_import(tmp_path, monkeypatch):
    """The rule engine itself: a training module importing the harness, a task importing another task."""
    fake = tmp_path / "quantbench" / "training" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from quantbench.harness import run\nimport mlflow\n")
    task = tmp_path / "tasks" / "detection" / "bad.py"
    task.parent.mkdir(parents=True)
    task.write_text("from tasks.classification.adapter import _Splits\nfrom quantbench.harness import run\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = "\n".join(_violations())
    assert "quantbench.training.bad imports quantbench.harness" in found
    assert "must not use mlflow" in found
    assert "a task imports another task" in found
    assert "tasks.detection.bad imports quantbench.harness" in found


@pytest.mark.parametrize(("modules", "forbidden"), [
    (["quantbench.engine"], ["hydra", "omegaconf", "mlflow", "pandas", "timm", "pycocotools", "matplotlib",
                            "quantbench.training", "quantbench.harness", "tasks"]),
    (["quantbench.training"], ["hydra", "omegaconf", "mlflow", "matplotlib", "quantbench.harness", "tasks"]),
    (["quantbench.peers.worker", "quantbench.peers.runner", "quantbench.peers.mapping"],
     ["hydra", "omegaconf", "mlflow", "pandas", "matplotlib", "onnxruntime", "quantbench.engine",
      "quantbench.harness", "quantbench.training", "tasks"]),
    (["tasks.classification.adapter", "tasks.detection.adapter"],
     ["hydra", "omegaconf", "mlflow", "matplotlib", "quantbench.harness"]),
])
def test_importing_a_layer_loads_nothing_above_it(modules, forbidden):
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
            f"print(sorted(m for m in {forbidden!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]"
