"""Fixtures and helpers for the console's browser tests (``tests/test_console_browser.py``).

The stack is real: a private ``redis-server``, one ``coordinator worker`` process importing
``tests.strategies_console``, and ``python -m coordinator serve --token T`` on a free loopback
port, waited on through ``/healthz``. The browser is Debian's Chromium driven headless by
Playwright's sync API (no browser is downloaded: ``executable_path`` points at the system
one, ``ALC_CHROMIUM`` overrides it). A missing Chromium or redis-server makes the fixtures
error, never skip.

Helpers: ``Pages`` opens pages (each in a fresh browser context, desktop or phone sized, with
or without the stored token) and collects every console error or warning and uncaught page
error, which the ``pages`` fixture fails the test on at teardown; ``Shots`` saves screenshots
under the test's ``tmp_path`` (and copies them to ``$ALC_CONSOLE_SHOTS`` when set, so a person
can pick one for the README); ``check_accessibility`` runs the accessibility pass on the
current view.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    expect,
    sync_playwright,
)

from tests.helpers import assert_eventually, free_port
from tests.procs import (
    FAST_ENV,
    ROOT,
    WAIT_S,
    WorkerPool,
    clean_env,
    cli_argv,
    new_namespace,
    sync_client,
)
from tests.redis_proc import RedisProcess

T = TypeVar("T")
CHROMIUM = os.environ.get("ALC_CHROMIUM", "/usr/bin/chromium")
#: The key under which the console keeps the API token (the contract in notes/console.md).
TOKEN_KEY = "alc-console-token"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 375, "height": 740}
#: The bound of every browser-side wait (Playwright's ``expect`` and actions); typical waits
#: are tens of milliseconds.
UI_WAIT_MS = 15_000
#: Console messages that are not errors of the page: Chromium logs every non-2xx fetch as a
#: console error. The console meets 401 (before the token is given) and 409 (a stale answer)
#: by design, and shows them itself; any other status, any script error and any warning (the
#: console reports unexpected failures with ``console.warn``) fails the test.
EXPECTED_HTTP = re.compile(
    r"^Failed to load resource: the server responded with a status of (401|409) "
)
expect.set_options(timeout=UI_WAIT_MS)


# -- the stack: redis-server, a worker process, `coordinator serve` -----------------------------


@dataclass
class Stack:
    redis_url: str
    namespace: str
    base: str
    token: str
    log_dir: Path
    workers: WorkerPool
    serve: subprocess.Popen[bytes] | None = None
    _client: httpx.Client | None = field(default=None, repr=False)
    _redis: Any = field(default=None, repr=False)

    @property
    def ui(self) -> str:
        return f"{self.base}/ui"

    @property
    def client(self) -> httpx.Client:
        """An HTTP client on the API with the bearer token (what a script would use)."""
        if self._client is None:
            self._client = httpx.Client(base_url=self.base, timeout=WAIT_S,
                                        headers={"Authorization": f"Bearer {self.token}"})
        return self._client

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; fails the test (with the server's log) unless it succeeds."""
        res = self.client.request(method, path, **kwargs)
        assert res.is_success, f"{method} {path}: {res.status_code} {res.text}\n{self.logs()}"
        return res.json()

    def start_session(self, strategy: str, input: dict[str, Any]) -> str:
        """Start a session through the API (for tests whose subject is not the Start form)."""
        first = self.api("POST", "/sessions", json={"strategy": strategy, "input": input})
        return str(first["session_id"])

    def snapshot(self, sid: str) -> dict[str, Any]:
        body: dict[str, Any] = self.api("GET", f"/sessions/{sid}",
                                        params={"pending": "full", "history": "true"})
        return body

    def redis(self) -> Any:
        """A plain redis-py client on the stack's server (closed with the stack)."""
        if self._redis is None:
            self._redis = sync_client(self.redis_url)
        return self._redis

    def serve_log(self) -> str:
        try:
            return (self.log_dir / "serve.log").read_text(errors="replace")[-4000:]
        except OSError as exc:
            return f"<no serve log: {exc}>"

    def logs(self) -> str:
        return f"--- serve\n{self.serve_log()}\n{self.workers.logs()}"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._redis is not None:
            self._redis.close()
        if self.serve is not None and self.serve.poll() is None:
            self.serve.send_signal(signal.SIGTERM)
            try:
                self.serve.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.serve.kill()
                self.serve.wait(timeout=10)
        self.workers.close()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on an event loop of its own thread: the test's thread may
    hold Playwright's loop (the sync API runs one), where ``asyncio.run`` is refused."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def eventually(predicate: Callable[[], object], message: str) -> None:
    """``assert_eventually`` (the suite's one polling loop) for a synchronous test."""
    _run(assert_eventually(predicate, timeout=WAIT_S, interval=0.05, message=message))


def _start_serve(stack: Stack) -> None:
    port = free_port()
    stack.base = f"http://127.0.0.1:{port}"
    with (stack.log_dir / "serve.log").open("wb") as log:
        stack.serve = subprocess.Popen(
            cli_argv("serve", "--redis", stack.redis_url, "--namespace", stack.namespace,
                     "--host", "127.0.0.1", "--port", str(port), "--token", stack.token),
            cwd=ROOT, env=clean_env(**FAST_ENV), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT,
        )
    proc = stack.serve

    async def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{stack.serve_log()}")
        async with httpx.AsyncClient(base_url=stack.base, timeout=5.0) as client:
            try:
                res = await client.get("/healthz")
            except httpx.TransportError:
                return False
        return res.status_code == 200 and res.json().get("workers") == 1

    _run(assert_eventually(healthy, timeout=WAIT_S, interval=0.05,
                           message="serve answers /healthz and sees the worker"))


@contextlib.contextmanager
def running_stack(log_dir: Path) -> Iterator[Stack]:
    """Start redis-server, one worker (``tests.strategies_console``) and ``serve``; all are
    stopped on exit, whatever happened."""
    server = RedisProcess()
    stack: Stack | None = None
    try:
        server.start()
        namespace = new_namespace()
        pool = WorkerPool(server.url, namespace, log_dir,
                          imports=("tests.strategies_console",))
        stack = Stack(server.url, namespace, "", secrets.token_urlsafe(16), log_dir, pool)
        _run(pool.start(concurrency=4))
        _start_serve(stack)
        yield stack
    finally:
        if stack is not None:
            stack.close()
        server.close()


# -- the browser ------------------------------------------------------------------------------


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"no Chromium at {CHROMIUM}: install Debian's chromium package "
                           "(.ci/run does) or point ALC_CHROMIUM at one")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Pages:
    """Opens pages on the console; every page's console errors and warnings and uncaught
    exceptions are collected in ``errors`` (expected 401/409 resource messages aside)."""

    browser: Browser
    stack: Stack
    errors: list[str] = field(default_factory=list)
    contexts: list[BrowserContext] = field(default_factory=list)

    def context(self, *, phone: bool = False, with_token: bool = True) -> BrowserContext:
        """A fresh browser profile (its own localStorage); ``with_token`` stores the API
        token in it as the console would after the person entered it."""
        storage: Any = None
        if with_token:
            storage = {"cookies": [], "origins": [{"origin": self.stack.base, "localStorage": [
                {"name": TOKEN_KEY, "value": self.stack.token}]}]}
        ctx = self.browser.new_context(viewport=PHONE if phone else DESKTOP,
                                       storage_state=storage, has_touch=phone,
                                       is_mobile=phone, device_scale_factor=2 if phone else 1)
        ctx.set_default_timeout(UI_WAIT_MS)
        self.contexts.append(ctx)
        return ctx

    def open(self, route: str = "#/", *, phone: bool = False, with_token: bool = True,
             context: BrowserContext | None = None) -> Page:
        """A new page on ``/ui`` at hash ``route``."""
        page = (context or self.context(phone=phone, with_token=with_token)).new_page()
        self.watch(page)
        page.goto(f"{self.stack.ui}{route}")
        return page

    def watch(self, page: Page) -> None:
        def on_console(msg: ConsoleMessage) -> None:
            if msg.type in ("error", "warning") and not EXPECTED_HTTP.match(msg.text):
                self.errors.append(f"console error on {page.url}: {msg.text}")

        page.on("console", on_console)
        page.on("pageerror", lambda exc: self.errors.append(f"page error on {page.url}: {exc}"))

    def close(self) -> None:
        for ctx in self.contexts:
            with contextlib.suppress(Exception):  # a context the test closed already
                ctx.close()


@dataclass
class Shots:
    """Screenshots of the views: saved as ``<tmp_path>/shots/<name>.png`` and, when
    ``ALC_CONSOLE_SHOTS`` names a folder, copied there too."""

    folder: Path
    saved: list[Path] = field(default_factory=list)

    def take(self, page: Page, name: str, *, full_page: bool = True) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page, animations="disabled",
                        caret="hide")
        assert path.stat().st_size > 0
        self.saved.append(path)
        extra = os.environ.get("ALC_CONSOLE_SHOTS")
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(extra) / path.name)
        return path


# -- checks -----------------------------------------------------------------------------------


def assert_no_horizontal_overflow(page: Page) -> None:
    widths = page.evaluate("""() => ({scroll: document.documentElement.scrollWidth,
        client: document.documentElement.clientWidth})""")
    assert widths["scroll"] <= widths["client"], \
        f"the page scrolls sideways at {page.viewport_size}: {widths} ({page.url})"


#: Roles of controls, in Chromium's accessibility tree, that must have a name.
CONTROL_ROLES = {"button", "textbox", "combobox", "ListBox", "checkbox", "radio", "spinbutton",
                 "slider", "searchbox", "link", "switch", "menuitem", "tab"}

#: The focusable elements of the page in DOM order, each as a key that survives a re-render
#: (a live list replaces its rows with equal ones): what it is, where it leads or what it
#: says, and which of the equal ones it is. ``mode`` "all": every key; "active": the key of
#: the focused element; "first": focus the first one.
_FOCUS_KEYS_JS = """(mode) => {
  const sel = 'a[href], button, input, select, textarea, summary, [tabindex], iframe, '
            + '[contenteditable=""], [contenteditable="true"]';
  const usable = el => !el.disabled && el.tabIndex >= 0 && !el.closest('[inert]')
      && !(el.type === 'hidden') && el.checkVisibility({visibilityProperty: true});
  const describe = el => {
    const name = el.getAttribute('aria-label') || (el.labels && el.labels[0]
      && el.labels[0].textContent) || el.textContent || el.getAttribute('name') || '';
    return [el.tagName.toLowerCase(), el.id, el.getAttribute('href') || '',
            name.trim().replace(/\\s+/g, ' ').slice(0, 60)].join(' | ');
  };
  const seen = new Map();
  const keyed = [...document.querySelectorAll(sel)].filter(usable).map(el => {
    const d = describe(el);
    seen.set(d, (seen.get(d) || 0) + 1);
    return [el, `${d} #${seen.get(d)}`];
  });
  if (mode === 'all') return keyed.map(([, key]) => key);
  if (mode === 'first') return keyed[0][0].focus();
  const el = document.activeElement;
  const hit = keyed.find(([e]) => e === el);
  return hit ? hit[1] : `(not in the focusable list) ${el ? el.outerHTML.slice(0, 120) : null}`;
}"""

_CONTROLS_JS = """() => {
  const bad = [];
  for (const el of document.querySelectorAll('input, select, textarea, button')) {
    if (el.type === 'hidden' || !el.checkVisibility({visibilityProperty: true})) continue;
    const byIds = (el.getAttribute('aria-labelledby') || '').split(/\\s+/).filter(Boolean)
      .map(id => (document.getElementById(id) || {}).textContent || '').join(' ');
    const named = [el.getAttribute('aria-label'), byIds,
      ...[...(el.labels || [])].map(l => l.textContent),
      el.tagName === 'BUTTON' ? el.textContent : '',
      ['submit', 'button', 'reset'].includes(el.type) ? el.value : '']
      .some(t => t && t.trim());
    if (!named) bad.push(el.outerHTML.slice(0, 160));
  }
  const positive = [...document.querySelectorAll('[tabindex]')]
    .filter(el => el.tabIndex > 0).map(el => el.outerHTML.slice(0, 160));
  // CSS that shows boxes in another order than the DOM's (flex/grid `order`, reversed flex)
  const reordered = [...document.querySelectorAll('body *')].filter(el => {
    const style = getComputedStyle(el);
    return style.order !== '0' || style.flexDirection.endsWith('-reverse');
  }).map(el => el.outerHTML.slice(0, 160));
  return {unnamed: bad, positive, reordered};
}"""


def _unnamed_in_ax_tree(page: Page) -> list[str]:
    """Controls that Chromium's own accessibility tree gives no name (what a screen reader
    would announce as just "button" or "edit text")."""
    cdp = page.context.new_cdp_session(page)
    try:
        nodes = cdp.send("Accessibility.getFullAXTree")["nodes"]
    finally:
        cdp.detach()
    bad = []
    for node in nodes:
        role = (node.get("role") or {}).get("value")
        if node.get("ignored") or role not in CONTROL_ROLES:
            continue
        name = str((node.get("name") or {}).get("value") or "").strip()
        if not name:
            bad.append(f"{role} (backend node {node.get('backendDOMNodeId')})")
    return bad


def check_accessibility(page: Page) -> None:
    """The accessibility pass on the page's current view:

    - every visible input, select, textarea and button has an accessible name, both by the
      HTML rules (label, aria-label, aria-labelledby, text) and in Chromium's accessibility
      tree (every control role there has a name);
    - no element has a positive ``tabindex``, and no CSS shows boxes in another order than
      the DOM's (flex or grid ``order``, reversed flex directions): DOM order is visual order;
    - pressing Tab from the first focusable element visits every focusable element once, in
      DOM order.
    """
    found = page.evaluate(_CONTROLS_JS)
    assert found["unnamed"] == [], f"controls without an accessible name on {page.url}: " \
                                   f"{found['unnamed']}"
    assert found["positive"] == [], f"positive tabindex on {page.url}: {found['positive']}"
    assert found["reordered"] == [], f"CSS reorders boxes on {page.url}: {found['reordered']}"
    unnamed = _unnamed_in_ax_tree(page)
    assert unnamed == [], f"controls without a name in the accessibility tree: {unnamed}"

    order: list[str] = page.evaluate(_FOCUS_KEYS_JS, "all")
    assert order, f"nothing focusable on {page.url}"
    page.evaluate(_FOCUS_KEYS_JS, "first")
    visited = [page.evaluate(_FOCUS_KEYS_JS, "active")]
    for _ in range(len(order) - 1):
        page.keyboard.press("Tab")
        visited.append(page.evaluate(_FOCUS_KEYS_JS, "active"))
    assert visited == order, (
        f"Tab order on {page.url} differs from the DOM order:\n"
        + "\n".join(f"  step {i}: focus {v!r}, expected {order[i]!r}"
                    for i, v in enumerate(visited) if v != order[i])
    )


# -- pytest fixtures (imported by the test module) ------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("console-stack")) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def pages(browser: Browser, stack: Stack) -> Iterator[Pages]:
    opened = Pages(browser, stack)
    try:
        yield opened
    finally:
        opened.close()
    assert opened.errors == [], "errors in the browser:\n" + "\n".join(opened.errors)


@pytest.fixture
def shots(tmp_path: Path) -> Shots:
    return Shots(tmp_path / "shots")
