"""The engine is a library by itself: no harness-level imports (DESIGN.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = {"hydra", "omegaconf", "mlflow", "pandas", "timm", "pycocotools"}
ENGINE = Path(__file__).resolve().parents[1] / "quantbench" / "engine"


def test_engine_sources_import_nothing_forbidden():
    offenders = []
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in {"tasks"}]
    assert offenders == []


def test_importing_the_engine_loads_nothing_forbidden():
    code = ("import sys, quantbench.engine; "
            f"print(sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
