"""The web console (``/ui`` on ``coordinator serve``) in a real browser: Debian's Chromium,
headless, driven by Playwright, on a real redis-server, a real worker process and a real
``coordinator serve --token`` (``tests/browser_support.py`` starts them once per module).

What a person does there: gives the API token once, starts a session from the form, answers
a batch out of order and then the next question, watches the session finish and the list
update without a reload; cancels a session (after changing their mind once); answers a
question another tab answered first and is told so politely; looks at the workers; does it
all on a phone-sized screen and with the keyboard alone. Each view gets the accessibility
pass and a screenshot; any console error or uncaught exception in the page fails the test.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Locator, Page, Route, expect

from coordinator.keys import Keys
from tests.browser_support import (
    Pages,
    Shots,
    Stack,
    assert_no_horizontal_overflow,
    browser,
    check_accessibility,
    eventually,
    pages,
    shots,
    stack,
)
from tests.strategies_console import QUIZ, batch_prompts, expected_result, final_prompt

__all__ = ["browser", "pages", "shots", "stack"]  # the fixtures this module uses

pytestmark = [pytest.mark.slow, pytest.mark.redis]


# -- helpers --------------------------------------------------------------------------------


def heading(page: Page, text: str) -> None:
    expect(page.get_by_role("heading", level=1)).to_have_text(text)


def query_form(page: Page, qid: str) -> Locator:
    return page.get_by_role("form", name=f"Query {qid}")


def answer(page: Page, qid: str, text: str) -> None:
    """Type ``text`` into query ``qid``'s box and press Send, as the person at that tab
    (brought to the front: Chromium slows the timers of a tab in the background)."""
    page.bring_to_front()
    form = query_form(page, qid)
    form.get_by_label(f"Answer {qid}").fill(text)
    form.get_by_role("button", name="Send").click()


def missing(page: Page) -> Locator:
    return page.get_by_test_id("missing")


def phase(page: Page) -> Locator:
    return page.get_by_test_id("phase")


def session_id_from(page: Page) -> str:
    expect(page).to_have_url(re.compile(r"#/sessions/[^/]+$"))
    return urlsplit(page.url).fragment.rsplit("/", 1)[1]


def open_forms(page: Page) -> Locator:
    """The query forms one can still answer (a refused form stays, closed, with its error)."""
    return page.locator("form[data-query-id]").filter(
        has=page.get_by_role("button", name="Send", exact=True, disabled=False))


def wait_paused_at(page: Page, qids: list[str]) -> None:
    """The page shows the session paused on exactly the queries ``qids``."""
    expect(phase(page)).to_have_text("paused")
    expect(open_forms(page)).to_have_count(len(qids))
    for qid in qids:
        expect(open_forms(page).and_(query_form(page, qid))).to_be_visible()


def rendered_json(locator: Locator) -> Any:
    return json.loads(locator.inner_text())


def api_phase(stack: Stack, sid: str) -> str:
    return str(stack.snapshot(sid)["phase"])


def counts_item(page: Page, phase_name: str) -> Locator:
    return page.get_by_role("list", name="Counts").locator(f'[data-phase="{phase_name}"]')


def session_row(page: Page, sid: str) -> Locator:
    return page.locator(f'tr[data-session-id="{sid}"]')


def tab_to(page: Page, target: Locator, limit: int = 80) -> None:
    """Press Tab (and nothing else) until ``target`` has the focus."""
    handle = target.element_handle()
    assert handle is not None
    for _ in range(limit):
        if page.evaluate("el => document.activeElement === el", handle):
            outline = page.evaluate("el => getComputedStyle(el).outlineStyle", handle)
            assert outline != "none", "the focused control shows no focus outline"
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"{limit} presses of Tab never reached {target}")


class Held:
    """Holds one page's ``GET /sessions/<sid>`` requests (the page's refetch of the
    session) until ``release()``: that tab has not yet heard that the session moved on, as
    a tab on a slow network would be when its person presses Send."""

    def __init__(self, page: Page, sid: str) -> None:
        self.page = page
        self.routes: list[Route] = []
        self.path = f"/sessions/{sid}"
        page.route(self._matches, self._hold)

    def _matches(self, url: str) -> bool:
        return urlsplit(url).path == self.path

    def _hold(self, route: Route) -> None:
        if route.request.method == "GET":
            self.routes.append(route)
        else:
            route.continue_()

    def release(self) -> None:
        for route in self.routes:
            # a request the page gave up on (it aborts a refetch a newer one replaces) is
            # handled already
            with contextlib.suppress(PlaywrightError):
                route.continue_()
        self.routes.clear()
        self.page.unroute(self._matches, self._hold)


STALE = "This question was already answered or the session moved on"


# -- 1. a person runs a session from start to finish --------------------------------------------


def test_start_answer_out_of_order_and_finish_live(
    pages: Pages, stack: Stack, shots: Shots
) -> None:
    ctx = pages.context(with_token=False)
    page = pages.open("#/", context=ctx)

    # asked for the token once
    token_form = page.get_by_role("form", name="API token")
    expect(token_form).to_be_visible()
    shots.take(page, "desktop-token")
    check_accessibility(page)
    token_form.get_by_label("API token").fill(stack.token)
    token_form.get_by_role("button", name="Save token").click()
    heading(page, "Sessions")
    expect(token_form).to_have_count(0)
    expect(page).to_have_title(re.compile("Sessions"))
    assert page.evaluate("k => localStorage.getItem(k)", "alc-console-token") == stack.token

    # a second tab of the same browser keeps the list in view; it is not asked again
    listing = pages.open("#/", context=ctx)
    heading(listing, "Sessions")
    expect(listing.get_by_role("form", name="API token")).to_have_count(0)
    expect(listing.get_by_test_id("live")).to_have_text("Live")

    # the Start form
    page.bring_to_front()
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Start a session") \
        .click()
    heading(page, "Start a session")
    form = page.get_by_role("form", name="Start a session")
    form.get_by_label("Strategy").select_option(QUIZ)
    expect(form).to_contain_text("Ask three ideas in one round")
    task = "name a cache"
    form.get_by_label(re.compile(r"^task")).fill(task)
    form.get_by_label(re.compile(r"^style")).fill("brisk")
    form.get_by_label("Max LLM calls").fill("10")
    shots.take(page, "desktop-start")
    check_accessibility(page)
    form.get_by_role("button", name="Start").click()

    sid = session_id_from(page)
    heading(page, f"Session {sid}")
    wait_paused_at(page, ["q-0", "q-1", "q-2"])
    assert rendered_json(page.get_by_test_id("input")) == {"task": task, "style": "brisk"}
    assert stack.snapshot(sid)["input"] == {"task": task, "style": "brisk"}
    prompts = batch_prompts(task)
    expect(query_form(page, "q-0")).to_contain_text(prompts[0])
    expect(query_form(page, "q-0")).to_contain_text("Answer in a brisk style.")
    expect(query_form(page, "q-2")).to_contain_text(prompts[2])
    expect(missing(page)).to_have_text("Waiting for 3 of 3 answers: q-0, q-1, q-2")
    expect(page.get_by_role("progressbar", name="Progress")).to_be_visible()
    # the budget from the form reached the session: 10 calls, 3 spent
    assert stack.snapshot(sid)["metrics"]["budget_remaining"]["llm_calls"] == 7
    # the other tab saw it appear, paused, without a reload
    expect(session_row(listing, sid)).to_contain_text("paused")
    shots.take(page, "desktop-session-paused")
    check_accessibility(page)

    # the batch, out of order; the missing line shrinks after each
    ideas = {"q-0": "a ring buffer", "q-1": "an LRU map", "q-2": "a TTL dict"}
    answer(page, "q-2", ideas["q-2"])
    expect(missing(page)).to_have_text("Waiting for 2 of 3 answers: q-0, q-1")
    expect(query_form(page, "q-2")).to_have_count(0)
    answer(page, "q-0", ideas["q-0"])
    expect(missing(page)).to_have_text("Waiting for 1 of 3 answers: q-1")
    expect(query_form(page, "q-0")).to_have_count(0)
    answer(page, "q-1", ideas["q-1"])

    # the session moves on by itself: the next question appears without a reload
    ordered = [ideas["q-0"], ideas["q-1"], ideas["q-2"]]
    wait_paused_at(page, ["q-0"])
    expect(query_form(page, "q-0")).to_contain_text(final_prompt(task, ordered))
    expect(missing(page)).to_have_text("Waiting for 1 answer: q-0")
    answer(page, "q-0", "an LRU map")

    expected = expected_result(task, ordered, "an LRU map")
    expect(phase(page)).to_have_text("completed")
    expect(page.get_by_test_id("result")).to_be_visible()
    assert rendered_json(page.get_by_test_id("result")) == expected
    assert stack.snapshot(sid)["result"] == expected
    expect(page.locator("form[data-query-id]")).to_have_count(0)
    expect(page.get_by_role("button", name="Cancel session")).to_have_count(0)
    expect(page.get_by_role("main")).to_contain_text("3 ideas in")  # the strategy's log
    history = page.locator("details").filter(has_text="Conversation history")
    history.locator("summary").click()
    expect(history).to_contain_text(final_prompt(task, ordered))
    expect(history).to_contain_text(ideas["q-2"])
    # round 2's q-0 is another question than round 1's: each round under its heading
    expect(history.get_by_role("heading", name="Round 1", exact=True)).to_be_visible()
    round_two = history.locator(".history-round").filter(
        has=page.get_by_role("heading", name="Round 2", exact=True))
    expect(round_two).to_contain_text(final_prompt(task, ordered))
    expect(page.locator(".metrics")).to_contain_text("Rounds answered")
    shots.take(page, "desktop-session-completed")
    check_accessibility(page)

    # the list updated itself: the row and the counts
    expect(session_row(listing, sid)).to_contain_text("completed")
    expect(session_row(listing, sid).get_by_role("link", name=sid)).to_have_attribute(
        "href", f"#/sessions/{sid}")
    completed = stack.api("GET", "/sessions")["counts"]["completed"]
    expect(counts_item(listing, "completed")).to_have_text(
        re.compile(rf"completed\D*\b{completed}\b"))
    shots.take(listing, "desktop-sessions")
    check_accessibility(listing)

    # the token was asked once: a reload and the other views do not ask again
    page.reload()
    heading(page, f"Session {sid}")
    expect(phase(page)).to_have_text("completed")
    expect(page.get_by_role("form", name="API token")).to_have_count(0)
    # the row's link leads to the session
    session_row(listing, sid).get_by_role("link", name=sid).click()
    heading(listing, f"Session {sid}")

    # Forget token: the browser no longer holds it, and the next load asks again
    page.get_by_role("button", name="Forget token").click()
    assert page.evaluate("k => localStorage.getItem(k)", "alc-console-token") is None
    page.reload()
    expect(page.get_by_role("form", name="API token")).to_be_visible()


# -- 2. cancelling, after changing one's mind once -------------------------------------------------


def test_cancel_from_the_session_page(pages: Pages, stack: Stack, shots: Shots) -> None:
    sid = stack.start_session(QUIZ, {"task": "cancel me"})
    page = pages.open(f"#/sessions/{sid}")
    heading(page, f"Session {sid}")
    wait_paused_at(page, ["q-0", "q-1", "q-2"])

    cancel = page.get_by_role("button", name="Cancel session")
    dialog = page.get_by_role("dialog")
    cancel.click()
    expect(dialog).to_be_visible()
    expect(dialog.get_by_role("heading", name="Cancel this session?")).to_be_visible()
    # the keyboard focus is inside the dialog, so a keyboard user is where they must act
    assert dialog.evaluate("d => d.contains(document.activeElement)")
    shots.take(page, "desktop-cancel-dialog", full_page=False)
    dialog.get_by_role("button", name="Keep it").click()
    expect(dialog).to_be_hidden()
    expect(cancel).to_be_focused()  # the focus goes back where it was
    expect(phase(page)).to_have_text("paused")
    assert api_phase(stack, sid) == "paused"

    cancel.click()  # Escape keeps it as well
    expect(dialog).to_be_visible()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert api_phase(stack, sid) == "paused"

    cancel.click()
    dialog.get_by_role("button", name="Yes, cancel it").click()
    expect(dialog).to_be_hidden()
    expect(phase(page)).to_have_text("cancelled")
    assert api_phase(stack, sid) == "cancelled"
    expect(cancel).to_have_count(0)
    expect(page.locator("form[data-query-id]")).to_have_count(0)
    outcome = page.get_by_role("heading", name="Cancelled").locator("..")
    expect(outcome).to_contain_text("This session was cancelled.")
    assert "null" not in outcome.inner_text()  # an absent error or result shows as nothing
    shots.take(page, "desktop-session-cancelled")
    check_accessibility(page)

    # the list's phase filter finds it, and leaves out the sessions in other phases
    other = stack.start_session(QUIZ, {"task": "still open"})
    listing = pages.open("#/")
    expect(session_row(listing, other)).to_contain_text("paused")
    listing.get_by_label("Phase").select_option("cancelled")
    expect(session_row(listing, sid)).to_contain_text("cancelled")
    expect(session_row(listing, other)).to_have_count(0)
    listing.get_by_label("Phase").select_option("paused")
    expect(session_row(listing, other)).to_be_visible()
    expect(session_row(listing, sid)).to_have_count(0)


# -- 3. a question another tab answered first ---------------------------------------------------


def test_answer_from_a_stale_tab_is_refused_politely(
    pages: Pages, stack: Stack, shots: Shots
) -> None:
    task = "two tabs"
    sid = stack.start_session(QUIZ, {"task": task})
    ctx = pages.context()
    tab1 = pages.open(f"#/sessions/{sid}", context=ctx)
    tab2 = pages.open(f"#/sessions/{sid}", context=ctx)
    for tab in (tab1, tab2):
        wait_paused_at(tab, ["q-0", "q-1", "q-2"])

    # tab 1 has not heard yet that tab 2 answered q-0 when its person presses Send
    held = Held(tab1, sid)
    answer(tab2, "q-0", "from tab 2")
    expect(missing(tab2)).to_have_text("Waiting for 2 of 3 answers: q-1, q-2")
    answer(tab1, "q-0", "from tab 1")
    alert = query_form(tab1, "q-0").get_by_role("alert")
    expect(alert).to_contain_text(STALE)
    held.release()
    # then it shows the current state, and still says what happened: the refused form
    # stays, closed, with its message, until the person has read it
    expect(missing(tab1)).to_have_text("Waiting for 2 of 3 answers: q-1, q-2")
    wait_paused_at(tab1, ["q-1", "q-2"])
    expect(query_form(tab1, "q-0").get_by_label("Answer q-0")).not_to_be_editable()
    expect(open_forms(tab1).and_(query_form(tab1, "q-0"))).to_have_count(0)
    expect(alert).to_contain_text(STALE)
    shots.take(tab1, "desktop-session-stale-error")
    check_accessibility(tab1)
    query_form(tab1, "q-0").get_by_role("button", name="Dismiss").click()
    expect(query_form(tab1, "q-0")).to_have_count(0)

    # the same when the round itself moved on (the answer names the round it was for)
    held = Held(tab1, sid)
    answer(tab2, "q-1", "second")
    answer(tab2, "q-2", "third")
    wait_paused_at(tab2, ["q-0"])
    expect(query_form(tab2, "q-0")).to_contain_text(
        final_prompt(task, ["from tab 2", "second", "third"]))
    answer(tab1, "q-1", "late")  # tab 1 still shows round 1
    expect(query_form(tab1, "q-1").get_by_role("alert")).to_contain_text(STALE)
    held.release()
    wait_paused_at(tab1, ["q-0"])
    expect(query_form(tab1, "q-0")).to_contain_text(
        final_prompt(task, ["from tab 2", "second", "third"]))

    # what was recorded is tab 2's answer: the result is built from it
    answer(tab1, "q-0", "second")
    expected = expected_result(task, ["from tab 2", "second", "third"], "second")
    for tab in (tab1, tab2):
        expect(phase(tab)).to_have_text("completed")
    assert stack.snapshot(sid)["result"] == expected
    assert rendered_json(tab2.get_by_test_id("result")) == expected


# -- 4. workers, and every view on a phone-sized screen --------------------------------------------


def test_workers_view_and_phone_sized_views(pages: Pages, stack: Stack, shots: Shots) -> None:
    (worker,) = stack.workers.procs
    report = stack.api("GET", "/workers")
    page = pages.open("#/workers")
    heading(page, "Workers")
    expect(page).to_have_title(re.compile("Workers"))
    live = page.locator("table").filter(has=page.locator("caption", has_text="Live workers"))
    row = live.locator("tbody tr").filter(has_text=worker.worker_id)
    expect(row).to_have_count(1)
    expect(row).to_contain_text(QUIZ)
    expect(page.get_by_role("heading", name=re.compile(r"^Dead letters"))).to_have_text(
        f"Dead letters ({report['dead_letter_count']})")
    expect(page.locator("caption", has_text="Dead letters")).to_have_count(1)

    # a queue entry no worker can run (an unknown job kind) becomes a dead letter; Refresh
    # shows it
    sid = stack.start_session(QUIZ, {"task": "a long task " * 8, "style": "x" * 60})
    before = report["dead_letter_count"]
    job = stack.redis().xadd(Keys(stack.namespace).jobs, {"k": "bogus", "sid": sid}).decode()
    eventually(lambda: stack.api("GET", "/workers")["dead_letter_count"] == before + 1,
               "the worker dead-letters the bogus job")
    page.get_by_role("button", name="Refresh").click()
    expect(page.get_by_role("heading", name=re.compile(r"^Dead letters"))).to_have_text(
        f"Dead letters ({before + 1})")
    letters = page.locator("table").filter(has=page.locator("caption", has_text="Dead letters"))
    letter = letters.locator("tbody tr").filter(has_text=job)
    expect(letter).to_contain_text("unknown job kind 'bogus'")
    expect(letter).to_contain_text(sid)
    expect(row).to_have_count(1)
    # a live refresh (here: another session starts) keeps the keyboard focus where it was
    link = letter.get_by_role("link", name=sid)
    link.focus()
    link.evaluate("a => { a.dataset.seen = 'before the refresh'; }")
    with page.expect_response(lambda res: "/workers?" in res.url):
        stack.start_session(QUIZ, {"task": "an event for the workers page"})
    expect(page.locator("a[data-seen]")).to_have_count(0)  # the rows were rebuilt
    expect(link).to_be_focused()
    shots.take(page, "desktop-workers")
    check_accessibility(page)

    # a phone: every view fits the width (no sideways scrolling of the page)
    ctx = pages.context(phone=True)
    phone = pages.open("#/", context=ctx)
    views = [("#/", "Sessions", "phone-sessions"), ("#/start", "Start a session", "phone-start"),
             (f"#/sessions/{sid}", f"Session {sid}", "phone-session"),
             ("#/workers", "Workers", "phone-workers")]
    for route, title, shot in views:
        phone.goto(f"{stack.ui}{route}")
        heading(phone, title)
        if route == "#/":
            expect(session_row(phone, sid)).to_have_count(1)
        elif route == "#/start":
            phone.get_by_label("Strategy").select_option(QUIZ)
        elif route.startswith("#/sessions/"):
            wait_paused_at(phone, ["q-0", "q-1", "q-2"])
        else:
            expect(phone.locator("tbody tr").filter(has_text=worker.worker_id)).to_have_count(1)
        assert_no_horizontal_overflow(phone)
        shots.take(phone, shot)
        check_accessibility(phone)
    stack.api("DELETE", f"/sessions/{sid}")


# -- 5. the keyboard alone ----------------------------------------------------------------------


def test_answer_a_session_with_the_keyboard_only(pages: Pages, stack: Stack) -> None:
    task = "keys only"
    sid = stack.start_session(QUIZ, {"task": task})
    page = pages.open(f"#/sessions/{sid}")
    wait_paused_at(page, ["q-0", "q-1", "q-2"])
    ideas = ["one", "two", "three"]
    for i, key in ((1, "Enter"), (0, " "), (2, "Enter")):
        qid = f"q-{i}"
        form = query_form(page, qid)
        tab_to(page, form.get_by_label(f"Answer {qid}"))
        page.keyboard.type(ideas[i])
        tab_to(page, form.get_by_role("button", name="Send"))
        page.keyboard.press(key)
        expect(form).to_have_count(0)
    wait_paused_at(page, ["q-0"])
    form = query_form(page, "q-0")
    tab_to(page, form.get_by_label("Answer q-0"))
    page.keyboard.type("three")
    expect(form.get_by_label("Answer q-0")).to_have_accessible_description("Ctrl+Enter sends")
    page.keyboard.press("Control+Enter")  # from the answer box itself
    expect(phase(page)).to_have_text("completed")
    assert rendered_json(page.get_by_test_id("result")) == expected_result(task, ideas, "three")


# -- 6. behind a reverse proxy that adds a path prefix ------------------------------------------


def test_the_console_works_behind_a_proxy_path_prefix(pages: Pages, stack: Stack) -> None:
    """A proxy that mounts the server under ``/alc/`` (and strips it): the page, its files,
    its API calls and its event streams all stay under the prefix, so the console works
    there unchanged. The proxy is the browser's own request routing here; a request that
    leaves the prefix never reaches the server and fails the test."""
    sid = stack.start_session(QUIZ, {"task": "behind a proxy"})
    prefix = f"{stack.base}/alc/"
    stray: list[str] = []

    def proxy(route: Route) -> None:
        url = route.request.url
        if not url.startswith(prefix):
            stray.append(url)
            route.abort()
            return
        route.continue_(url=f"{stack.base}/{url[len(prefix):]}")

    page = pages.context().new_page()
    page.route(f"{stack.base}/**", proxy)
    # (/ui's redirect to ui/ is relative, so it keeps the prefix: test_webui_assets checks
    # it; the browser's routing cannot stand in for a proxy across a redirect)
    page.goto(f"{prefix}ui/#/")
    heading(page, "Sessions")
    expect(page.get_by_test_id("live")).to_have_text("Live")
    session_row(page, sid).get_by_role("link", name=sid).click()
    wait_paused_at(page, ["q-0", "q-1", "q-2"])
    answer(page, "q-1", "through the proxy")
    expect(missing(page)).to_have_text("Waiting for 2 of 3 answers: q-0, q-2")
    assert stack.snapshot(sid)["round_query_ids"] == ["q-0", "q-1", "q-2"]
    assert stray == [], f"requests that left the prefix: {stray}"
