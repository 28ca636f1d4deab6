"""The report: report.md and the self-contained report.html, rendered from an output folder.

`data` reads what both show, `notes` holds the sentences both print, `markdown` renders report.md; `html` renders
the page, with its charts from `svg`, its example articles from `examples` and its escaping from `escape`."""
