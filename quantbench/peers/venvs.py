"""Isolated virtualenvs for the peer toolkits that cannot share quantbench's environment.

AMD Quark pins onnxruntime <= 1.28 and onnx <= 1.22 and imports transformers, so it lives in its own
virtualenv (``.engines/quark``) and runs there as a subprocess (:mod:`quantbench.peers.worker`).
Its pinned package set is ``engines/<name>/requirements.txt``.

Command line (``make engines`` runs the first)::

    python -m quantbench.peers.venvs create quark [--root .engines] [--force]
    python -m quantbench.peers.venvs python quark [--root .engines]    # prints the interpreter
    python -m quantbench.peers.venvs status quark [--root .engines]

Creation is idempotent: a stamp file in the venv records a fingerprint of the requirements file
(and of the Python version and of this recipe), written last. A rerun whose fingerprint matches is a
no-op; a changed requirements file, or a venv left half-built by an interrupted run, is rebuilt from
scratch. torch is installed first and alone, at the exact pin of the requirements file: pip then
takes the local CPU wheel, where any range that admits a newer torch pulls a multi-GB CUDA build.

Only the standard library is imported here.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENGINES", "VenvError", "VenvSpec", "create", "fingerprint", "missing_message", "plan",
           "require_python", "status", "venv_dir", "venv_python"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO / ".engines"
STAMP = ".quantbench-venv.json"
#: Bump when the way a venv is built changes (steps, smoke check): every venv is then rebuilt.
RECIPE = 1


@dataclass(frozen=True)
class VenvSpec:
    """One engine's virtualenv.

    Attributes:
        requirements: its pinned requirements, relative to the repository root; the ``torch==`` line
            is installed first, alone.
        smoke: Python code run in the new venv before it is stamped (imports the toolkit; a JIT
            build the toolkit does on first import is done here, once, into the venv).
    """

    requirements: str
    smoke: str


ENGINES: dict[str, VenvSpec] = {
    "quark": VenvSpec(
        requirements="engines/quark/requirements.txt",
        smoke=("import onnx, onnxruntime, torch, quark; from quark.torch import ModelQuantizer, export_onnx; "
               "print('amd-quark', quark.__version__, 'torch', torch.__version__, "
               "'onnxruntime', onnxruntime.__version__)"),
    ),
}


class VenvError(RuntimeError):
    """A venv is missing or could not be built; the message is one line, fit to print as is."""


def _spec(name: str) -> VenvSpec:
    if name not in ENGINES:
        raise VenvError(f"unknown engine venv {name!r} (known: {', '.join(sorted(ENGINES))})")
    return ENGINES[name]


def _root(root: str | os.PathLike | None) -> Path:
    return DEFAULT_ROOT if root is None else Path(root).absolute()


def venv_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """Where the engine's venv lives (``<root>/<name>``; root defaults to ``<repo>/.engines``)."""
    _spec(name)
    return _root(root) / name


def _python_in(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def requirements_path(name: str) -> Path:
    return REPO / _spec(name).requirements


def fingerprint(requirements: str | os.PathLike, python_version: str | None = None) -> str:
    """What a venv is stamped with: the requirements file's bytes, the Python version (major.minor) and the recipe."""
    python_version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    digest = hashlib.sha256()
    digest.update(f"recipe={RECIPE};python={python_version};".encode())
    digest.update(Path(requirements).read_bytes())
    return digest.hexdigest()


def read_stamp(venv: Path) -> dict | None:
    try:
        data = json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def plan(venv: Path, requirements: str | os.PathLike, python_version: str | None = None) -> tuple[str, str]:
    """What ``create`` would do, without doing it: ``("ready" | "create" | "rebuild", reason)``."""
    if not venv.exists():
        return "create", f"{venv} does not exist"
    stamp = read_stamp(venv)
    if stamp is None:
        return "rebuild", f"{venv} has no stamp (a build that did not finish)"
    if not _python_in(venv).exists():
        return "rebuild", f"{venv} has no interpreter"
    if stamp.get("fingerprint") != fingerprint(requirements, python_version):
        return "rebuild", f"{Path(requirements).name} (or the Python version, or the recipe) changed since {venv} was built"
    return "ready", f"{venv} is up to date"


def status(name: str, root: str | os.PathLike | None = None) -> tuple[str, str]:
    """``("ready" | "create" | "rebuild", reason)`` for an engine's venv (``create``: it is missing)."""
    return plan(venv_dir(name, root), requirements_path(name))


def venv_python(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """The interpreter of the engine's venv, or None when it was never completely built.

    A venv built from an older requirements file still counts (``status`` tells it is stale), so a
    run never fails only because the pins moved; ``make engines`` rebuilds it.
    """
    venv = venv_dir(name, root)
    python = _python_in(venv)
    return python if read_stamp(venv) is not None and python.exists() else None


def missing_message(name: str, root: str | os.PathLike | None = None) -> str:
    """The one line to show when an engine's venv is missing."""
    return (f"the {name} engine's virtualenv is missing ({venv_dir(name, root)}): "
            f"run `make engines` (python -m quantbench.peers.venvs create {name})")


def require_python(name: str, root: str | os.PathLike | None = None) -> Path:
    """Like :func:`venv_python`, but raises :class:`VenvError` (one line) when the venv is missing."""
    python = venv_python(name, root)
    if python is None:
        raise VenvError(missing_message(name, root))
    return python


# ---------------------------------------------------------------------------------------------- building

def _torch_pin(requirements: Path) -> str:
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if re.fullmatch(r"torch\s*==\s*[\w.+]+", line):
            return line.replace(" ", "")
    raise VenvError(f"{requirements}: no exact `torch==VERSION` pin (an unpinned torch pulls a multi-GB CUDA build)")


def _last_error(log: Path) -> str:
    """The most telling line of a failed pip/smoke run: its last ERROR line, else its last non-empty line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith(("ERROR:", "error:")) or re.match(r"^\w*(Error|Exception)\b", line):
            return line
    return lines[-1] if lines else ""


def _run(cmd: list[str], log: Path, what: str, env: dict[str, str]) -> None:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env).returncode
    if rc != 0:
        detail = _last_error(log)
        raise VenvError(f"{what} failed (exit {rc})" + (f": {detail}" if detail else "") + f" [log: {log}]")


@contextlib.contextmanager
def _locked(path: Path):
    """One build of a venv at a time (two `make engines` at once wait for each other)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_venv(venv: Path) -> None:
    if venv.is_symlink() or (venv.exists() and not venv.is_dir()):
        raise VenvError(f"refusing to replace {venv}: not a directory")
    if venv.exists() and any(venv.iterdir()) and not (venv / "pyvenv.cfg").exists():
        raise VenvError(f"refusing to delete {venv}: it is not a virtualenv (no pyvenv.cfg); move it away")
    shutil.rmtree(venv, ignore_errors=False)


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _say(text: str, end: str = "\n") -> None:
    print(text, end=end, flush=True)


def create(name: str, root: str | os.PathLike | None = None, *, force: bool = False,
           python: str | None = None, say=_say) -> Path:
    """Build the engine's venv unless an up-to-date one is there; returns its interpreter.

    Raises:
        VenvError: a step failed (its message is one line, naming the step and pip's error; the
            full output is in ``<root>/<name>.log``).
    """
    spec = _spec(name)
    requirements = requirements_path(name)
    if not requirements.exists():
        raise VenvError(f"{requirements} is missing")
    venv = venv_dir(name, root)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _locked(venv.parent / f".{name}.lock"):
        action, reason = plan(venv, requirements)
        if action == "ready" and not force:
            say(f"[engines] {name}: up to date ({venv})")
            return _python_in(venv)
        log = venv.parent / f"{name}.log"
        log.write_text(f"# {name} venv build, {time.strftime('%Y-%m-%d %H:%M:%S')}: {reason}\n")
        start = time.perf_counter()
        say(f"[engines] {name}: {'rebuilding' if action == 'rebuild' else 'creating'} {venv} ({reason}; log: {log})")
        if venv.exists():
            _remove_venv(venv)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
        # JIT-built kernels (Quark's hw_emulation) go into the venv: built once here, gone with it.
        env["TORCH_EXTENSIONS_DIR"] = str(venv / "torch_extensions")
        base = python or getattr(sys, "_base_executable", None) or sys.executable
        vpy = str(_python_in(venv))
        pip = [vpy, "-m", "pip", "install", "--no-input"]
        torch_pin = _torch_pin(requirements)
        steps = [
            ("virtualenv", [base, "-m", "venv", str(venv)]),
            (torch_pin, [*pip, torch_pin]),
            (f"the pinned set ({requirements.relative_to(REPO)})", [*pip, "-r", str(requirements)]),
            ("pip check", [vpy, "-m", "pip", "check"]),
            ("import check", [vpy, "-c", spec.smoke]),
        ]
        for i, (what, cmd) in enumerate(steps, 1):
            t0 = time.perf_counter()
            say(f"[engines] {name}: {i}/{len(steps)} {what} ...", end="")
            try:
                _run(cmd, log, f"{name} venv: {what}", env)
            except VenvError:
                say(" failed")
                raise
            say(f" {time.perf_counter() - t0:.0f} s")
        seconds = time.perf_counter() - start
        size = _du(venv)
        versions = _last_line(log)
        stamp = {"engine": name, "fingerprint": fingerprint(requirements), "requirements": str(requirements),
                 "python": sys.version.split()[0], "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "seconds": round(seconds, 1), "bytes": size, "versions": versions}
        (venv / STAMP).write_text(json.dumps(stamp, indent=2))
        say(f"[engines] {name}: ready in {seconds:.0f} s, {size / 2**30:.1f} GiB ({versions}): {vpy}")
        return Path(vpy)


def _last_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quantbench.peers.venvs",
                                     description="The peer engines' isolated virtualenvs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command, helptext in (("create", "build the venv unless an up-to-date one exists (idempotent)"),
                              ("python", "print the venv's interpreter (exit 1 with one line if missing)"),
                              ("status", "say whether the venv is ready, missing or stale")):
        p = sub.add_parser(command, help=helptext)
        p.add_argument("name", choices=sorted(ENGINES))
        p.add_argument("--root", default=None, help=f"where the venvs live (default: {DEFAULT_ROOT})")
        if command == "create":
            p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            create(args.name, args.root, force=args.force)
        elif args.command == "python":
            print(require_python(args.name, args.root))
        else:
            action, reason = status(args.name, args.root)
            print({"ready": "ready", "create": "missing", "rebuild": "stale"}[action] + f": {reason}")
            return 0 if action == "ready" else 1
    except VenvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: {args.name} venv: interrupted (the next `create` rebuilds it)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
