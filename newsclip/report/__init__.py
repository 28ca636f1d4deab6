"""The report: report.md and the self-contained report.html."""
