"""Reports that read run directories and sweep folders: plots, `report.html`, sweep tables."""

from .html import write_report
from .plots import plot_confusion_matrix, plot_loss_accuracy
from .runfiles import ReportError
from .sweep import collect_run_summary, plot_sweep, write_sweep_table

__all__ = [
    "ReportError",
    "collect_run_summary",
    "plot_confusion_matrix",
    "plot_loss_accuracy",
    "plot_sweep",
    "write_report",
    "write_sweep_table",
]
