"""The web console: a single page served at ``/ui/`` by ``coordinator serve``.

The page and its assets ship inside this package (``static/``) and are read with
``importlib.resources``, so the console works with no internet and no build step. They hold
no data, so they need no bearer token; the page's own API calls send the token the person
enters. Every response here carries a strict Content-Security-Policy (only this origin's
scripts, styles and connections; no inline code, no framing), ``nosniff`` and
``no-referrer``. Responses carry an ETag and ``Cache-Control: no-cache``: the browser keeps
its copy but asks on each load whether it changed, so an upgraded package is never served
stale (the files have no versioned names). None of these routes is in ``/openapi.json``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import Response

UI = "/ui"
STATIC = "/ui/static"

CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
#: The asset types the console ships; a file of any other suffix is not served.
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """Every file of ``static/`` by name, read once (they never change while we run)."""
    assets = {}
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in TYPES:
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            assets[entry.name] = Asset(body, TYPES[suffix], etag)
    return assets


def _respond(request: Request, asset: Asset | None) -> Response:
    if asset is None:
        return Response(b"not found", status_code=404, media_type="text/plain",
                        headers=HEADERS)
    headers = {**HEADERS, "ETag": asset.etag}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


def mount_console(app: FastAPI) -> None:
    """Serve the console on ``app``: the page at ``/ui/`` (``/ui`` redirects there), its
    files under ``/ui/static/``; no token, not in the OpenAPI schema. The page names its
    files and the API by relative URLs, so it also works behind a proxy that adds a path
    prefix."""
    assets = load_assets()

    @app.api_route(UI, methods=["GET", "HEAD"], include_in_schema=False)
    async def console_root() -> Response:
        # A relative Location ("ui/"): behind a proxy that mounts us under /prefix, the
        # browser goes to /prefix/ui/, where the page's relative references resolve.
        return Response(status_code=308, headers={**HEADERS, "Location": "ui/"})

    @app.api_route(UI + "/", methods=["GET", "HEAD"], include_in_schema=False)
    async def console_page(request: Request) -> Response:
        return _respond(request, assets.get("index.html"))

    @app.api_route(STATIC + "/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def console_asset(request: Request, name: str) -> Response:
        return _respond(request, assets.get(name))
