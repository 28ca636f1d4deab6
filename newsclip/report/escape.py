"""HTML escaping for the page and its inline SVG: article texts and backbone names are untrusted input."""

from __future__ import annotations

import html


def esc(value: object) -> str:
    """Escape anything for HTML text and attribute values (quotes too, so it is safe inside an attribute)."""
    return html.escape(str(value), quote=True)
