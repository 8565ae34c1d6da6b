"""The README's engine quick start runs exactly as written, in a fresh interpreter."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_readme_quick_start_runs_as_written(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Engine quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert code.lstrip().startswith("import torch, torchvision"), "the snippet imports torchvision first"
    script = tmp_path / "quick_start.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    noise = [line for line in out.stderr.splitlines() if re.search(r"warn|deprecat|Failed to load|^W\d{4} ", line, re.I)]
    assert noise == [], "the quick start prints library noise:\n" + "\n".join(noise)
    assert "coverage:" in out.stdout and "ParityReport" in out.stdout
    assert (tmp_path / "resnet18_int8.onnx").exists()
