"""Reports of run directories: summaries, PNG plots and report.md, rebuilt from metrics.jsonl."""

from .markdown import build_report, summarize, table_rows
from .plots import make_plots

__all__ = ["build_report", "summarize", "table_rows", "make_plots"]
