"""``/docs`` without the internet: Swagger UI from the installed ``swagger_ui_bundle``.

FastAPI's own ``/docs`` page loads Swagger UI's script and style from a CDN, so on a host
with no way out (the usual place for a coordinator) it stays blank; its ``/redoc`` exists
only as a CDN script. Here the page is FastAPI's ``get_swagger_ui_html`` with every URL
pointing at this server: the assets are the files the ``swagger_ui_bundle`` package ships,
served under ``/docs/assets``, and Swagger UI's online validator is turned off. ReDoc is
not served. Neither the page nor its assets need the bearer token: they hold no data, and
the calls a reader tries from the page send the token they enter.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

DOCS = "/docs"
ASSETS = "/docs/assets"


def mount_docs(app: FastAPI) -> None:
    """Serve ``/docs`` and its assets on ``app`` (made with ``docs_url=None`` and
    ``redoc_url=None``, so FastAPI's CDN pages do not exist)."""
    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    title = f"{app.title} - API docs"

    @app.get(DOCS, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=title,
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
            # null: no badge fetched from validator.swagger.io
            swagger_ui_parameters={"validatorUrl": None})
