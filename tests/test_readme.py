"""The README's engine quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_quick_start_runs(tmp_path, monkeypatch, capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Engine quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "coverage:" in out and "ParityReport" in out
    assert (tmp_path / "resnet18_int8.onnx").exists()
