"""Image downloads over http(s): a total timeout per attempt, a size cap, retries on transient failures.

Named `download` rather than `http` so that it never shadows the standard library's `http` package.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Literal

from newsclip.ingest.config import NetworkConfig

FETCH_CHUNK = 1 << 16


@dataclass
class Fetched:
    """An image's bytes, or why there are none: `reason` is a short category (counted), `detail` says more."""

    data: bytes | None
    kind: Literal["ok", "missing", "unreadable"]
    reason: str = ""
    detail: str = ""


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (the default handler would also follow ftp://)."""

    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http URL {newurl!r}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _read_body(response, url: str, max_bytes: int, deadline: float, timeout_s: float) -> Fetched:
    """The response's bytes up to `max_bytes`; TimeoutError once `deadline` (monotonic) has passed."""
    length = response.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > max_bytes:
        return Fetched(None, "unreadable", "too large", f"Content-Length {length} > max_image_bytes {max_bytes}: {url}")
    chunks, size = [], 0
    while chunk := response.read(FETCH_CHUNK):
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            return Fetched(None, "unreadable", "too large", f"more than max_image_bytes {max_bytes}: {url}")
        if time.monotonic() > deadline:  # a server that trickles bytes never trips the socket timeout
            raise TimeoutError(f"response not complete after {timeout_s}s")
    return Fetched(b"".join(chunks), "ok")


def fetch(url: str, net: NetworkConfig, max_bytes: int) -> Fetched:
    """GET one image with a total timeout per attempt, a size cap, and retries on transient failures."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        return Fetched(None, "unreadable", "unsupported URL scheme", url)
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    last = ""
    for attempt in range(net.retries + 1):
        if attempt:
            time.sleep(net.backoff_s * 2 ** (attempt - 1))
        deadline = time.monotonic() + net.timeout_s
        try:
            request = urllib.request.Request(url, headers={"User-Agent": net.user_agent})
            with opener.open(request, timeout=net.timeout_s) as response:
                return _read_body(response, url, max_bytes, deadline, net.timeout_s)
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
            if e.code in (404, 410):
                return Fetched(None, "missing", last, url)
            if not (e.code in (408, 429) or e.code >= 500):
                return Fetched(None, "unreadable", last, f"{e.msg}: {url}")
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, refused/reset connections
            reason = getattr(e, "reason", e)
            last = "timeout" if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError) else \
                f"{type(reason).__name__}: {reason}"
    return Fetched(None, "unreadable", f"download failed ({last.split(':')[0]})",
                   f"{net.retries + 1} attempts, last: {last}: {url}")
