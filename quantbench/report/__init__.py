"""Reports: MLflow runs -> pandas -> markdown tables, plots, and accuracy gates.

Depends on :mod:`quantbench.harness` (for the store and the config), never the
other way round.
"""

from quantbench.report.build import Report, ReportError, write_report
from quantbench.report.gate import GateResult, format_results, passed, run_gate
from quantbench.report.runs import latest, load_runs
from quantbench.report.table import results_table

__all__ = [
    "GateResult",
    "Report",
    "ReportError",
    "format_results",
    "latest",
    "load_runs",
    "passed",
    "results_table",
    "run_gate",
    "write_report",
]
