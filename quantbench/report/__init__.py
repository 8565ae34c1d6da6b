"""Reports: the runs of record (one sweep's) -> pandas -> markdown tables, plots, and accuracy gates.

Depends on :mod:`quantbench.harness` (for the store and the config), never the
other way round.
"""

from quantbench.report.build import Report, ReportError, check_readme, write_report
from quantbench.report.gate import GateOutcome, GateResult, check_gate, format_results, passed, run_gate
from quantbench.report.record import Selection, SweepRecord, select
from quantbench.report.runs import latest, load_runs
from quantbench.report.table import results_table

__all__ = [
    "GateOutcome",
    "GateResult",
    "Report",
    "ReportError",
    "Selection",
    "SweepRecord",
    "check_gate",
    "check_readme",
    "format_results",
    "latest",
    "load_runs",
    "passed",
    "results_table",
    "run_gate",
    "select",
    "write_report",
]
