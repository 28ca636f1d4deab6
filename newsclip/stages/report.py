"""report stage: `report.md` and the self-contained `report.html`, from the evaluate stage's metrics."""

from __future__ import annotations

from newsclip.config import JobConfig
from newsclip.report.html import write_html
from newsclip.report.markdown import render_markdown
from newsclip.runtime.stage import Stage
from newsclip.runtime.store import record_stage, write_text

__all__ = ["run"]  # the stage; the rendering lives in newsclip.report


def _run(cfg: JobConfig) -> dict:
    path = write_text(cfg.layout.report_md, render_markdown(cfg))
    return record_stage(cfg.output, "report", [path, write_html(cfg.output, cfg)])


run = Stage("report", _run)
