"""``/docs`` works with no internet: the page names only this server's URLs, its assets
are the installed Swagger UI's files served here with their content types, the bundled
Swagger UI can render the OpenAPI version FastAPI writes, and none of it needs the token.
No Redis is needed: the docs never touch the registry.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from swagger_ui_bundle import swagger_ui_path

from tests.helpers import offline_api

#: Every URL-like value in the page: attributes, and the spec URL the script loads.
URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']*)["']|url:\s*'([^']*)'|(\w+:)?//[\w.-]+""")
TYPES = {".js": ("text/javascript", "application/javascript"), ".css": ("text/css",),
         ".png": ("image/png",)}




def page_urls(html: str) -> list[str]:
    urls = []
    for match in URL.finditer(html):
        attr, spec, _ = match.groups()
        urls.append(attr if attr is not None else spec if spec is not None else match[0])
    return urls


@pytest.mark.parametrize("token", [None, "s3cret"])
async def test_docs_page_and_assets_are_served_here(token: str | None) -> None:
    async with offline_api(token) as c:
        res = await c.get("/docs")
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
        html = res.text
        urls = page_urls(html)
        assert urls, html
        for url in urls:  # nothing off-host: no scheme, no host, no protocol-relative URL
            assert url.startswith("/") and not url.startswith("//"), url
        assert "http://" not in html and "https://" not in html
        assert "validatorUrl" in html  # its online badge turned off too

        assets = [u for u in urls if u.startswith("/docs/assets/")]
        assert {Path(u).suffix for u in assets} == {".js", ".css", ".png"}
        for url in assets:
            got = await c.get(url)
            assert got.status_code == 200, url
            assert got.headers["content-type"].split(";")[0] in TYPES[Path(url).suffix], url
            assert got.content == (Path(str(swagger_ui_path)) / Path(url).name).read_bytes()

        spec_url = next(u for u in urls if u.endswith(".json"))
        spec = await c.get(spec_url)
        assert spec.status_code == 200 and spec.json()["info"]["title"] == "alc-coordinator"
        assert (await c.get("/redoc")).status_code == 404  # CDN-only: not served
        assert (await c.get("/docs/assets/nothing.js")).status_code == 404


async def test_bundled_swagger_ui_renders_this_openapi_version() -> None:
    """Swagger UI renders OpenAPI 3.1 (what FastAPI writes) from version 5 on; an older
    bundle shows "Unable to render this definition" instead of the API."""
    async with offline_api() as c:
        version = (await c.get("/openapi.json")).json()["openapi"]
        script = (await c.get("/docs/assets/swagger-ui-bundle.js")).text
    bundled = re.search(r"swagger-ui-(\d+)\.(\d+)\.(\d+)", Path(str(swagger_ui_path)).name)
    assert bundled is not None, swagger_ui_path
    if version.startswith("3.1"):
        assert int(bundled[1]) >= 5, f"Swagger UI {bundled[0]} cannot show OpenAPI {version}"
        assert "isOAS31" in script
