"""The ASGI app (Starlette): `POST /search`, `GET /articles/{id}`, `GET /images/{id}`, `GET /healthz` and the page at
`/`. Every request is bounded (body, text, image bytes and pixels, k), ids are only looked up in the loaded index
(none reaches a file path), and with a token every request must carry it. Uvicorn runs it on a laptop; Ray Serve
runs the same app on a cluster (cluster/serve.py)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time
from http.cookies import SimpleCookie
from importlib.resources import files
from typing import Any
from urllib.parse import parse_qs

from newsclip.serve.batcher import Batcher, Query
from newsclip.serve.query import QueryEncoders, QueryError
from newsclip.serve.thumbnails import ThumbnailError, thumbnail

MAX_K = 1000
DEFAULT_K = 20
MAX_BODY_BYTES = 12 << 20  # a base64 image of MAX_IMAGE_BYTES and the rest of the request
MAX_IMAGE_BYTES = 8 << 20
MAX_TEXT_CHARS = 10_000
MAX_ID_CHARS = 512
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def needs_token(host: str) -> bool:
    """Binding anywhere but loopback exposes the archive: a token is then required."""
    return host not in LOOPBACK


def create_app(index, cfg=None, token: str | None = None, batcher: Batcher | None = None):
    """The app over `index` (an IndexFollower, or a StaticIndex with the job config `cfg` whose encoders it uses),
    started and stopped with the app's lifespan."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    cfg = cfg if cfg is not None else index.cfg
    batcher = batcher if batcher is not None else Batcher(QueryEncoders(cfg))
    max_pixels = cfg.encode.max_image_pixels  # thumbnails are bounded as encode bounds images
    page = files("newsclip.serve").joinpath("page.html").read_text()

    def snapshot():
        current = index.current
        if current is None:
            raise HTTPError(503, f"no index to serve yet: {index.waiting or 'loading'}")
        return current

    def backbone_of(snap, name) -> str:
        if name is None:
            return snap.default_backbone
        backbone = snap.backbone_named(name) if isinstance(name, str) else None
        if backbone is None:
            raise HTTPError(404, f"unknown backbone {str(name)[:100]!r}; this index has {sorted(snap.backbones)}")
        return backbone

    async def search(request: Request):
        body = await _read_body(request)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "the body must be JSON: {\"text\": \"...\", \"k\": 20}") from None
        if not isinstance(payload, dict):
            raise HTTPError(400, "the body must be a JSON object: {\"text\": \"...\", \"k\": 20}")
        unknown = set(payload) - {"text", "image", "k", "backbone", "target"}
        if unknown:
            raise HTTPError(422, f"unknown fields {sorted(unknown)[:5]}; accepted: text | image, k, backbone, target")
        k = payload.get("k", DEFAULT_K)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise HTTPError(422, f"k must be an integer from 1 to {MAX_K}, not {str(k)[:20]}")
        target = payload.get("target", "images")
        if target not in ("images", "articles"):
            raise HTTPError(422, "target must be images or articles")
        text, image = payload.get("text"), payload.get("image")
        if (text is None) == (image is None):
            raise HTTPError(422, "give exactly one of text and image (base64)")
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise HTTPError(422, "text must be a non-empty string")
            if len(text) > MAX_TEXT_CHARS:
                raise HTTPError(413, f"text of {len(text)} characters; at most {MAX_TEXT_CHARS}")
        else:
            if not isinstance(image, str):
                raise HTTPError(422, "image must be a base64 string")
            if len(image) > MAX_IMAGE_BYTES * 4 // 3 + 4:
                raise HTTPError(413, f"image over {MAX_IMAGE_BYTES} bytes")
            try:
                image = base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError):
                raise HTTPError(422, "image is not valid base64") from None
        snap = snapshot()
        backbone = backbone_of(snap, payload.get("backbone"))
        if target == "articles" and snap.backbones[backbone].texts is None:
            raise HTTPError(404, f"backbone {backbone} has no text embeddings in this index")
        query = Query(snap, backbone, k, text=text, image=image, target=target)
        try:
            answer = await asyncio.wrap_future(batcher.submit(query))
        except QueryError as e:
            raise HTTPError(422, str(e)) from None
        if target == "articles":
            results = [{"article_id": a, "score": s, "title": snap.articles.title(a)} for a, s in answer]
        else:
            results = [{"image_id": i, "score": s, "article_ids": snap.articles.using(i)} for i, s in answer]
        return JSONResponse({"backbone": backbone, "index": snap.run_id, "results": results})

    async def article(request: Request):
        snap = snapshot()
        article_id = _id(request.path_params["article_id"])
        backbone = backbone_of(snap, request.query_params.get("backbone"))
        rankings = snap.backbones[backbone].rankings
        ranked = rankings.of(article_id) if rankings is not None else None
        if ranked is None:
            raise HTTPError(404, f"article {article_id[:100]!r} has no rankings in index {snap.run_id}")
        return JSONResponse({"article_id": article_id, "title": snap.articles.title(article_id),
                             "backbone": backbone, "index": snap.run_id,
                             "images": [{"image_id": i, "score": s} for i, s in ranked]})

    async def image(request: Request):
        snap = snapshot()
        image_id = _id(request.path_params["image_id"])
        file = snap.images.file(image_id) if snap.images is not None else None
        if file is None:
            raise HTTPError(404, f"image {image_id[:100]!r} is not in index {snap.run_id}")
        try:
            data = await asyncio.to_thread(thumbnail, file, image_id, max_pixels)
        except ThumbnailError as e:
            raise HTTPError(404, str(e)) from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    async def healthz(request: Request):
        snap = index.current
        if snap is None:
            return JSONResponse({"index": None, "waiting": index.waiting}, status_code=503)
        return JSONResponse({"index": snap.run_id, **snap.sizes(), "waiting": index.waiting,
                             "batches": batcher.batches, "queries": batcher.queries,
                             "encode_s": round(batcher.encode_s, 3), "search_s": round(batcher.search_s, 3),
                             "cpu_s": round(time.process_time(), 3)})

    async def home(request: Request):
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'; img-src 'self'; "
                                           "style-src 'unsafe-inline'; script-src 'unsafe-inline'"})

    async def http_error(request: Request, exc: HTTPError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def not_found(request: Request, exc: Exception):
        status = getattr(exc, "status_code", 404)
        return JSONResponse({"error": getattr(exc, "detail", None) or "not found"}, status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(index.start)
        try:
            yield
        finally:
            index.stop()
            batcher.close()

    app = Starlette(routes=[Route("/", home), Route("/search", search, methods=["POST"]),
                            Route("/articles/{article_id:path}", article), Route("/images/{image_id:path}", image),
                            Route("/healthz", healthz)],
                    exception_handlers={HTTPError: http_error, 404: not_found, 405: not_found},
                    lifespan=lifespan)
    app.state.index, app.state.batcher = index, batcher
    return TokenGuard(app, token) if token else app


def _id(value: str) -> str:
    if len(value) > MAX_ID_CHARS:
        raise HTTPError(404, f"an id of {len(value)} characters; none is longer than {MAX_ID_CHARS}")
    return value


async def _read_body(request) -> bytes:
    """The body, refused (413) past MAX_BODY_BYTES, whatever Content-Length claims."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes")
    return bytes(body)


class TokenGuard:
    """ASGI middleware: every HTTP request carries the token (`Authorization: Bearer T`, a `newsclip_token` cookie,
    or `?token=T`, which the page uses for its image links), or gets 401."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        if scope["type"] != "http" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": "missing or wrong token: send Authorization: Bearer <token>"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

    def _allowed(self, scope: dict[str, Any]) -> bool:
        given = []
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given.append(value[7:].strip())
            elif name == b"cookie":
                cookie = SimpleCookie()
                try:
                    cookie.load(value.decode("latin-1"))
                except Exception:  # noqa: BLE001 - a malformed cookie is no token
                    continue
                if "newsclip_token" in cookie:
                    given.append(cookie["newsclip_token"].value.encode())
        given += [v.encode() for v in parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])]
        return any(hmac.compare_digest(g, self.token) for g in given)


# asyncio's own loop and h11, whatever else is installed: uvicorn would pick uvloop and httptools when present
# (ray[serve] brings both), and with them p50 at 1M rows was 3-8 ms slower in three paired runs (CPU per query +1 ms)
UVICORN_LOOP = {"loop": "asyncio", "http": "h11"}


def serve(cfg, host: str = "127.0.0.1", port: int = 8000, token: str | None = None, poll_s: float | None = None
          ) -> None:
    """Run the app under uvicorn until interrupted."""
    import uvicorn

    from newsclip.serve.follow import POLL_S, IndexFollower

    if needs_token(host) and not token:
        raise ValueError(f"serve: binding to {host} exposes the archive beyond this machine; give --token T "
                         "(or bind to 127.0.0.1)")
    _check_free(host, port)  # before the index loads: uvicorn binds only after the app has started
    app = create_app(IndexFollower(cfg, POLL_S if poll_s is None else poll_s), token=token)
    uvicorn.run(app, host=host, port=port, log_level="warning", **UVICORN_LOOP)


def _check_free(host: str, port: int) -> None:
    """ValueError naming the address when nothing can listen on it (another server there, a host not of this
    machine)."""
    import socket

    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as e:
        raise ValueError(f"serve: cannot listen on {host}:{port} ({e.strerror or e}); is another server there? "
                         "Give another --port") from None
