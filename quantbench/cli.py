"""``quantbench``: run, analyze, sweep, report, gate, data, ui, server.

Exit status: 0 fine; 1 a run failed, a gate did not pass, or a bug (with its
traceback); 2 a bad input: a bad command line, a bad config, missing data, a
tracking store that cannot work, a busy port (one line on stderr naming the
culprit and the fix, no traceback; ``--debug`` or ``QUANTBENCH_DEBUG=1`` adds
the traceback). ``-v`` shows the library warnings quantbench filters by
default (see :mod:`quantbench.quiet`).

The command line is parsed, and a run's or sweep's overrides are checked
(:mod:`quantbench.harness.preflight`), before torch, the engine or MLflow
are imported: ``--help`` and a typo return in well under two seconds.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from quantbench.errors import BadInputError, UsageError
from quantbench.quiet import verbose

__all__ = ["DATA_WRITERS", "main"]

#: ``quantbench data NAME``: the tasks helper that writes that data set, imported by name
#: (quantbench never imports tasks statically) -> (module, function, default kwargs).
DATA_WRITERS: dict[str, tuple[str, str, dict]] = {
    "digits": ("tasks.classification.data", "write_digits_imagefolder", {"size": 32, "seed": 0}),
    "shapes": ("tasks.detection.data", "write_shapes_coco", {"seed": 0}),
}


#: Hydra's own flags that ``quantbench run`` passes through; with any other flag the preflight is skipped.
_HYDRA_RUN_FLAGS = ("-m", "--multirun")


def _cmd_run(args: argparse.Namespace) -> int:
    from quantbench.harness.preflight import check_overrides

    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc}: needs at least 1")
    flags = [a for a in args.overrides if a.startswith("-")]
    if all(f in _HYDRA_RUN_FLAGS for f in flags):  # e.g. --cfg job or --help: Hydra's business
        check_overrides([a for a in args.overrides if not a.startswith("-")])
    from quantbench.harness.sweep import launch

    if args.nproc == 1:
        return launch(args.overrides)
    # Data-parallel: torchrun starts N processes of the Hydra entry point (gloo on CPU, nccl on CUDA).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "quantbench.harness.main", *args.overrides]
    return subprocess.run(cmd, check=False).returncode


def _cmd_analyze(args: argparse.Namespace) -> int:
    """One run with the sensitivity stage on: the table is printed and logged with the run."""
    from quantbench.harness.preflight import check_overrides

    extra = ["run.sensitivity=true", *(["run.sensitivity_metric=true"] if args.metric else [])]
    if not any(o.split("=", 1)[0].lstrip("+~") == "scheme" for o in args.overrides):
        raise UsageError("analyze needs a quantized scheme to analyze, e.g. quantbench analyze model=resnet18 "
                         "scheme=ptq_w4a8 (the float scheme has no quantizer)")
    check_overrides([*args.overrides, *extra])
    from quantbench.harness.sweep import launch

    return launch([*args.overrides, *extra])


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _cmd_sweep(args: argparse.Namespace) -> int:
    from quantbench.harness.preflight import check_overrides, sweep_file

    source = sweep_file(args.task, args.grid)  # both before torch and MLflow are imported
    check_overrides([f"sweep={source.name}", *args.overrides])
    from quantbench.harness.sweep import sweep

    # SIGTERM (a scheduler's stop, kill) stops like Ctrl-C: joblib then stops its worker processes
    # instead of leaving them running orphaned; the interrupted run is recorded KILLED.
    signal.signal(signal.SIGTERM, _interrupt)
    outcome = sweep(args.task, args.overrides, jobs=args.jobs, sweep_id=args.id, launcher=args.launcher,
                    grid=args.grid)
    if outcome.exit_code == 2:  # missing data or a bad config: the job already said why, in one line
        return 2
    skipped = "" if outcome.skipped is None else (
        f", {outcome.skipped} skipped (already FINISHED with the same config; run.force=true reruns them)")
    print(f"sweep {outcome.sweep_id}: {outcome.jobs or '?'} jobs: {len(outcome.finished)} FINISHED, "
          f"{len(outcome.failed)} FAILED{skipped}")
    for label, error, run_id in outcome.failed:
        print(f"  FAILED {label}: {error} (MLflow run {run_id})")
    if outcome.exit_code:
        return outcome.exit_code
    if outcome.bad_input:  # e.g. a full disk: the failed runs are recorded, the others finished
        return 2
    return 1 if outcome.failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from quantbench.harness.paths import project_root
    from quantbench.harness.preflight import sweep_file

    sweep_file(args.task, args.grid)  # an unknown task or grid: one line, before MLflow is imported

    readme = args.readme
    if readme is not None and "=" in readme and not Path(readme).exists():
        # `report TASK --readme tracking.uri=...`: argparse gave --readme the override that followed it.
        args.overrides, readme = [readme, *args.overrides], ""
    if readme is not None:
        readme = Path(readme) if readme else project_root() / "README.md"
    from quantbench.report import write_report

    report = write_report(args.task, args.overrides, out_dir=args.out, readme=readme, sweep=args.sweep,
                          partial=args.partial, grid=args.grid)
    print(report.table)
    for note in report.notes:
        print(f"note: {note}")
    print(f"wrote {report.markdown} ({report.rows} rows of sweep {report.sweep_id}"
          f"{', PARTIAL' if report.partial else ''}), {', '.join(str(p) for p in report.plots)}"
          + (f"; refreshed {report.readme}" if report.readme else ""))
    return 0


def _cmd_gate(args: argparse.Namespace) -> int:
    from quantbench.harness.preflight import sweep_file

    sweep_file(args.task, args.grid)  # an unknown task or grid: one line, before MLflow is imported
    from quantbench.report import check_gate, format_results

    outcome = check_gate(args.task, args.overrides, path=args.file, sweep=args.sweep, grid=args.grid)
    results, record = outcome.results, outcome.selection.record
    print(format_results(results))
    for note in outcome.selection.notes():
        print(f"note: {note}")
    failed = [r for r in results if not r.passed]
    print(f"gate {args.task}{f' (grid {args.grid})' if args.grid else ''}: "
          f"{'PASS' if outcome.passed else 'FAIL'} on sweep {record.sweep_id} "
          f"({len(results) - len(failed)} passed, {len(failed)} failed)")
    return 0 if outcome.passed else 1


def _cmd_data(args: argparse.Namespace) -> int:
    module, function, defaults = DATA_WRITERS[args.name]
    try:
        writer = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"the {args.name} data writer {module}.{function} is not available ({exc}); "
                         "install quantbench with its tasks (pip install -e .)") from exc
    kwargs = {**defaults, **({"size": args.size} if args.size else {}), "seed": args.seed}
    result = writer(args.out, **kwargs)
    print(f"wrote the {args.name} data set to {result or args.out}")
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from quantbench.harness.preflight import sweep_file

    sweep_file(args.task, args.grid)  # an unknown task or grid: one line, before MLflow is imported
    from quantbench.report.runs import task_store

    store, experiment = task_store(args.task, args.overrides, grid=args.grid)
    exp_id = store.experiment_id(experiment, create=False)
    base = f"http://{args.host}:{args.port}/"
    link = f"{base}#/experiments/{exp_id}/runs?workflowType=machine_learning" if exp_id else base
    _check_port(args.host, args.port, "ui")
    banner = (f"MLflow UI on {store.uri}\n  runs table ({experiment}): {link}\n"
              "  (metric and parameter columns: pick them under 'Columns'; Ctrl-C stops the UI)")
    args.banner = banner
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "ui", "--backend-store-uri", store.uri, "--registry-store-uri", store.uri,
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    if store.artifact_root:
        cmd += ["--default-artifact-root", store.artifact_root]
    return _serve(cmd, args.host, args.port, "ui", banner=args.banner)


def _cmd_server(args: argparse.Namespace) -> int:
    from quantbench.harness.paths import project_root

    root = project_root() / "mlruns" / "server"
    backend = args.backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
    if backend.startswith("postgresql") and importlib.util.find_spec("psycopg2") is None:
        raise UsageError(f"--backend-store-uri {backend}: PostgreSQL needs its driver: pip install psycopg2-binary")
    artifacts = Path(args.artifacts_destination or root / "artifacts").expanduser().resolve()
    artifacts.mkdir(parents=True, exist_ok=True)
    if backend.startswith("sqlite:///"):
        Path(backend.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    _check_port(args.host, args.port, "server")
    uri = f"http://{args.host}:{args.port}"
    mlflow = Path(sys.executable).with_name("mlflow")
    return _serve([str(mlflow), "server", "--backend-store-uri", backend, "--registry-store-uri", backend,
                   "--serve-artifacts",
                   "--artifacts-destination", str(artifacts), "--host", args.host, "--port", str(args.port),
                   "--workers", str(args.workers)], args.host, args.port, "server",
                  banner=f"MLflow tracking server on {uri} (backend {backend}, artifacts {artifacts})\n"
                         f"  log to it: quantbench sweep TASK tracking.uri={uri}   (Ctrl-C stops it)")


def _check_port(host: str, port: int, command: str) -> None:
    """A port another process holds is a bad input: say so before starting MLflow, not in its log."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                what = "is in use (another MLflow UI or server?)" if exc.errno == errno.EADDRINUSE else \
                    "needs privileges"
                raise UsageError(f"--port {port}: {host}:{port} {what}; pick another port: quantbench {command} "
                                 f"--port {port + 1} (make {command} ARGS='--port {port + 1}')") from exc
            raise UsageError(f"--host {host}: cannot listen there ({exc.strerror}); use 127.0.0.1 or 0.0.0.0") \
                from exc


def _quiet_env() -> dict[str, str]:
    """MLflow's server without its start-up INFO lines, access log and Starlette deprecation warning
    (nothing a user can act on); ``-v`` shows them."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if not verbose():
        env.update(MLFLOW_LOGGING_LEVEL="WARNING",
                   PYTHONWARNINGS="ignore:starlette.middleware.wsgi is deprecated")
    return env


def _healthy(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=1) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _serve(cmd: list[str], host: str, port: int, command: str, *, banner: str | None = None,
           startup_s: float = 120.0) -> int:
    """Run an MLflow server command in the foreground until it exits, Ctrl-C or SIGTERM.

    The banner (the link) is printed once the server answers its health check;
    a server that exits before that is an error, with its exit status.
    """
    if not verbose():
        cmd = [*cmd, "--uvicorn-opts", "--log-level warning"]
    proc = subprocess.Popen(cmd, env=_quiet_env())
    # SIGTERM to the mlflow parent stops its server children; pass ours on to it.
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    probe = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    try:
        deadline = time.monotonic() + startup_s
        while proc.poll() is None and not _healthy(probe, port) and time.monotonic() < deadline:
            time.sleep(0.25)
        if proc.poll() is not None:
            print(f"quantbench {command}: MLflow exited with status {proc.returncode} before it served on "
                  f"{host}:{port} (its output is above)", file=sys.stderr)
            return proc.returncode or 1
        if banner:
            print(banner, flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run, "analyze": _cmd_analyze, "sweep": _cmd_sweep, "report": _cmd_report, "gate": _cmd_gate,
    "data": _cmd_data, "ui": _cmd_ui, "server": _cmd_server,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quantbench", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", default=os.environ.get("QUANTBENCH_DEBUG") == "1",
                        help="show the full traceback of a bad-input error too (or QUANTBENCH_DEBUG=1)")
    parser.add_argument("-v", "--verbose", action="store_true", default=os.environ.get("QUANTBENCH_VERBOSE") == "1",
                        help="show the library warnings and logs quantbench filters by default (or QUANTBENCH_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    # The same two flags after the command too (quantbench run --debug ...); unset there, the top level's stand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    run = sub.add_parser("run", parents=[common], help="one run; the rest goes to Hydra (e.g. model=resnet18 scheme=ptq_pow2)")
    run.add_argument("--nproc", type=int, default=1,
                     help="data-parallel processes under torchrun (DDP: gloo on CPU, nccl on CUDA)")
    analyze = sub.add_parser("analyze", parents=[common],
                             help="one run plus per-layer sensitivity (only this layer / all but it quantized: "
                                  "output SQNR, --metric: the task metric), printed and logged to MLflow")
    analyze.add_argument("--metric", action="store_true",
                         help="also score each layer on the task's metric (two evaluations per layer)")
    sweep = sub.add_parser("sweep", parents=[common], help="a Hydra multirun over conf/sweep/TASK.yaml "
                                                           "(--grid GRID: conf/sweep/TASK_GRID.yaml)")
    sweep.add_argument("task")
    sweep.add_argument("--jobs", type=int, default=1, help="parallel jobs on this machine (joblib launcher)")
    sweep.add_argument("--launcher", help="conf/hydra/launcher: basic, parallel, slurm, slurm_local "
                                          "(default: basic, or parallel with --jobs > 1)")
    sweep.add_argument("--id", help="sweep id (default: TASK-<time>; with --grid GRID: TASK_GRID-<time>)")
    report = sub.add_parser("report", parents=[common], help="one sweep's MLflow runs -> reports/TASK.md "
                                                             "(--grid GRID: reports/TASK_GRID.md), plots (--readme: README table)")
    report.add_argument("task")
    report.add_argument("--out", type=Path, help="output folder (default: reports/)")
    report.add_argument("--sweep", metavar="ID", help="the sweep to report (default: the newest complete sweep "
                                                      "of the task's config; pass the sweep's overrides too)")
    report.add_argument("--partial", action="store_true",
                        help="report the newest sweep (or --sweep ID) even if incomplete, labelled partial")
    report.add_argument("--readme", nargs="?", const="", metavar="PATH",
                        help="also refresh the task's table between its markers in PATH (default: the project's "
                             "README.md); without --readme no README is touched")
    gate = sub.add_parser("gate", parents=[common], help="check conf/gates/TASK.yaml (--grid GRID: "
                                                         "conf/gates/TASK_GRID.yaml) against the runs of record (as report reads)")
    gate.add_argument("task")
    gate.add_argument("--file", type=Path, help="gate file (default: conf/gates/TASK.yaml)")
    gate.add_argument("--sweep", metavar="ID", help="the sweep to gate (default: the newest complete sweep of the "
                                                    "task's config, else the newest sweep)")
    data = sub.add_parser("data", parents=[common], help="write a generated data set (e.g. digits)")
    data.add_argument("name", choices=sorted(DATA_WRITERS))
    data.add_argument("--out", type=Path, required=True)
    data.add_argument("--size", type=int, help="image size (default: the writer's)")
    data.add_argument("--seed", type=int, default=0)
    ui = sub.add_parser("ui", parents=[common], help="the MLflow UI on the store, with the runs-table link")
    ui.add_argument("--task", default="digits", help="whose runs table to link (default: digits)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    server = sub.add_parser("server", parents=[common], help="a shared MLflow tracking server (sqlite or PostgreSQL backend)")
    server.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=int, default=5001)
    server.add_argument("--backend-store-uri", help="default: sqlite:///mlruns/server/mlflow.db; or postgresql://...")
    server.add_argument("--artifacts-destination", help="artifact root (default: mlruns/server/artifacts)")
    server.add_argument("--workers", type=int, default=2)
    for p in (sweep, report, gate, ui):
        p.add_argument("--grid", metavar="GRID", help="a named grid of the task: conf/sweep/TASK_GRID.yaml (e.g. "
                                                      "hard), with its own MLflow experiment, report and gate "
                                                      "(default: the task's own conf/sweep/TASK.yaml)")
        p.epilog = "Any further KEY=VALUE arguments are Hydra overrides (e.g. tracking.uri=sqlite:///x.db)."
    return parser


def _bad_input_line(exc: BaseException) -> str | None:
    """The one line for a bad input, or None for a bug (which gets its traceback)."""
    from quantbench.errors import one_line

    if isinstance(exc, BadInputError):
        return one_line(exc)
    module = type(exc).__module__.split(".", 1)[0]
    if module in ("hydra", "omegaconf"):  # a config Hydra could not compose (outside the preflight's checks)
        from quantbench.harness.preflight import explain

        return explain(exc)
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                        NotADirectoryError)) and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command != "run" and any(a.startswith("-") for a in extra):
        parser.error(f"unrecognized arguments: {' '.join(a for a in extra if a.startswith('-'))}")
    args.overrides = extra
    if args.command != "run":  # Hydra sets up logging for runs itself (and for a sweep's jobs)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Read by quantbench.quiet and the Hydra entry point here, in Hydra jobs, loky workers and torchrun ranks.
    flags = {"QUANTBENCH_VERBOSE": args.verbose, "QUANTBENCH_DEBUG": args.debug}
    saved = {name: os.environ.get(name) for name in flags}
    os.environ.update({name: "1" for name, on in flags.items() if on})
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"quantbench {args.command}: interrupted; run the same command again to complete what is missing",
              file=sys.stderr)
        return 130
    except Exception as exc:
        line = _bad_input_line(exc)
        if line is None:
            raise  # a bug: Python prints the traceback, exit status 1
        if args.debug:
            traceback.print_exception(exc)
        print(f"quantbench {args.command}: {line}", file=sys.stderr)
        return 2
    finally:
        for name, value in saved.items():  # main() may be called again in the same process (tests, the API)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


if __name__ == "__main__":
    sys.exit(main())
