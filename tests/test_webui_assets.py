"""The console's static files (``coordinator.webui``), served by the HTTP app without a
browser: ``/ui`` and every asset with its content type and the console's security headers,
with no token even when the API has one (while the API still refuses without it), nothing
fetched from another host, every file the page names present, none of it in the OpenAPI
schema, the entry module's imports all served as JavaScript from the same folder, and the
files found as package data through ``importlib.resources``.
No Redis is needed: these routes never touch the registry.
"""

from __future__ import annotations

import re
from importlib import resources

import httpx
import pytest

from coordinator.webui import CSP, load_assets
from tests.helpers import offline_api

#: The page's own files; the ES modules console.js imports are every other ``.js`` of the
#: folder (``SCRIPTS``).
ASSETS = ("index.html", "console.js", "console.css", "favicon.svg")
TYPES = {"html": "text/html", "js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
#: URLs the page names: src/href attributes.
REFS = re.compile(r"""(?:src|href)\s*=\s*["']([^"']*)["']""")
#: The one absolute URL an asset may hold: SVG's namespace name, an identifier that is
#: never fetched.
SVG_NS = 'xmlns="http://www.w3.org/2000/svg"'




#: ``import … from './x.js'`` (and bare ``import './x.js'``) in a module.
IMPORTS = re.compile(r"""^\s*import\b[^'"]*?['"]([^'"]+)['"]""", re.MULTILINE)


def static_text(name: str) -> str:
    return resources.files("coordinator.webui").joinpath("static", name).read_text("utf-8")


def scripts() -> list[str]:
    """Every JavaScript module the console ships."""
    static = resources.files("coordinator.webui").joinpath("static")
    return sorted(e.name for e in static.iterdir() if e.name.endswith(".js"))


def check_headers(res: httpx.Response) -> None:
    assert res.headers["content-security-policy"] == CSP
    assert res.headers["x-content-type-options"] == "nosniff"
    assert res.headers["referrer-policy"] == "no-referrer"
    assert res.headers["cache-control"] == "no-cache"


def test_csp_is_the_contracts() -> None:
    assert CSP == ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                   "script-src 'self'; connect-src 'self'; frame-ancestors 'none'")


@pytest.mark.parametrize("token", [None, "s3cret"])
async def test_page_and_assets_are_served_without_a_token(token: str | None) -> None:
    async with offline_api(token) as c:
        res = await c.get("/ui/")
        assert res.status_code == 200
        assert res.headers["content-type"].startswith("text/html")
        check_headers(res)
        assert res.text == static_text("index.html")
        # /ui goes to /ui/ by a relative Location (kept under a proxy's path prefix), where
        # the page's relative references resolve
        bare = await c.get("/ui")
        assert (bare.status_code, bare.headers["location"]) == (308, "ui/")
        check_headers(bare)
        for name in (*ASSETS, *scripts()):
            res = await c.get(f"/ui/static/{name}")
            assert res.status_code == 200, name
            assert res.headers["content-type"].split(";")[0] == TYPES[name.rsplit(".", 1)[1]]
            check_headers(res)
            assert res.text == static_text(name)
        missing = await c.get("/ui/static/nothing.js")
        assert missing.status_code == 404
        check_headers(missing)
        if token:  # the API itself still wants the token
            assert (await c.get("/sessions")).status_code == 401
            assert (await c.get("/strategies")).status_code == 401


async def test_revalidation_answers_304_by_etag() -> None:
    async with offline_api() as c:
        first = await c.get("/ui/static/console.js")
        again = await c.get("/ui/static/console.js",
                            headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        check_headers(again)
        assert (await c.head("/ui/")).status_code == 200


async def test_console_routes_are_not_in_the_openapi_schema() -> None:
    async with offline_api() as c:
        paths = (await c.get("/openapi.json")).json()["paths"]
    assert not [p for p in paths if p.startswith("/ui")]


def test_assets_name_no_other_host() -> None:
    for name in (*ASSETS, *scripts()):
        text = static_text(name).replace(SVG_NS, "")
        assert "http://" not in text and "https://" not in text, name
        assert not re.search(r"""["'(]\s*//[\w.-]""", text), f"protocol-relative URL in {name}"


def test_index_names_only_files_that_exist() -> None:
    html = static_text("index.html")
    refs = REFS.findall(html)
    files = [r for r in refs if r.startswith("static/")]
    assert {r.rsplit("/", 1)[1] for r in files} >= {"console.js", "console.css", "favicon.svg"}
    # the entry alone: the other modules are its imports (a second <script> would run twice)
    assert [r for r in files if r.endswith(".js")] == ["static/console.js"]
    for ref in refs:  # relative: the page also works behind a proxy's path prefix
        assert ref.startswith(("static/", "#", "../docs")), ref
    present = set(load_assets())
    for ref in files:
        assert ref.removeprefix("static/") in present, ref


def test_no_inline_script_or_style() -> None:
    """The CSP forbids them, so they would silently not run."""
    html = static_text("index.html")
    assert re.findall(r"<script\b[^>]*>", html) == [
        '<script type="module" src="static/console.js">']
    assert "<style" not in html and " style=" not in html and " on" + "click=" not in html


def test_script_writes_no_markup() -> None:
    """Server values reach the page as text nodes only, in every module."""
    assert len(scripts()) > 1 and "console.js" in scripts()
    for name in scripts():
        js = static_text(name)
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                     "new Function"):
            assert sink not in js, f"{sink} in {name}"


def test_modules_import_only_their_siblings() -> None:
    """The page loads the entry module alone; every other module is reached through
    ``import './x.js'`` (a relative URL, so it resolves under /ui/static/ and the CSP's
    ``script-src 'self'`` allows it), names a file that is served, and every module is used.
    The folder is flat: the package data is ``webui/static/*``."""
    reached, todo = {"console.js"}, ["console.js"]
    while todo:
        name = todo.pop()
        for spec in IMPORTS.findall(static_text(name)):
            assert re.fullmatch(r"\./[a-z][a-z0-9-]*\.js", spec), f"{name} imports {spec!r}"
            target = spec.removeprefix("./")
            assert target in load_assets(), f"{name} imports missing {target}"
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert reached == set(scripts()), f"modules nothing imports: {set(scripts()) - reached}"
    static = resources.files("coordinator.webui").joinpath("static")
    assert not [e.name for e in static.iterdir() if e.is_dir()]


async def test_modules_are_served_as_javascript() -> None:
    """A module script with another content type is refused by the browser (strict MIME
    checking), so each one must say text/javascript."""
    async with offline_api("s3cret") as c:
        for name in scripts():
            res = await c.get(f"/ui/static/{name}")
            assert res.status_code == 200, name
            assert res.headers["content-type"] == "text/javascript; charset=utf-8", name
            check_headers(res)


def test_package_data_is_found_through_importlib_resources() -> None:
    static = resources.files("coordinator.webui").joinpath("static")
    names = {entry.name for entry in static.iterdir()}
    assert set(ASSETS) <= names
    assert set(load_assets()) == {n for n in names if n.rsplit(".", 1)[-1] in TYPES}
