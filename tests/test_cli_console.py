"""What ``coordinator run`` shows (``coordinator.console.RunView``) and how the terminal
responder reads, in this process: log lines once each by ``seq`` however the kept window
of recent logs slides, strategy text never read as markup, progress once per change, the
live bar out of the way of a prompt, and the terminal's lines and blocks (its read that
never ends is the Ctrl-C test's, in ``test_cli_run.py``)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator

import pytest
from rich.console import Console

from coordinator.console import RunView
from coordinator.errors import ResponderFailed
from coordinator.models import LlmQuery
from coordinator.responders import StdinLines, Terminal


def view(*, quiet: bool = False, terminal: bool = False) -> tuple[RunView, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=100, highlight=False,
                      soft_wrap=True)
    return RunView(quiet=quiet, console=console), out


def logs(*seqs: int) -> list[dict[str, object]]:
    return [{"ts": 0, "level": "info", "source": "ctx.log", "message": f"line {n}", "seq": n}
            for n in seqs]


def test_each_log_line_shows_once_in_order_as_the_window_slides() -> None:
    shown, out = view()
    shown.update({"recent_logs": logs(1, 2, 3)})
    shown.update({"recent_logs": logs(2, 3, 4, 5)})  # the kept window moved on
    shown.update({"recent_logs": logs(3, 4, 5)})  # nothing new
    assert out.getvalue().splitlines() == [f"  log [info] line {n}" for n in range(1, 6)]


def test_progress_shows_once_per_change_and_strategy_text_is_not_markup() -> None:
    shown, out = view()
    step = {"step": 1, "total": 2, "message": "[bold red]draft[/bold red]"}
    shown.update({"progress": step, "recent_logs": [
        {"level": "warning", "source": "ctx.log", "message": "[link=x]not a link[/link]",
         "seq": 1}]})
    shown.update({"progress": dict(step)})
    shown.update({"progress": {"step": 2, "total": 2, "message": None}})
    assert out.getvalue().splitlines() == [
        "  log [warning] [link=x]not a link[/link]",
        "  progress 1/2 [bold red]draft[/bold red]",
        "  progress 2/2",
    ]


def test_quiet_shows_only_the_session_and_the_prompts_a_person_must_answer() -> None:
    shown, out = view(quiet=True)
    shown.note("embedded")
    shown.session("s-1", "cot")
    shown.update({"progress": {"step": 1, "total": 1}, "recent_logs": logs(1)})
    q = LlmQuery("q-0", "What now?", system="Be brief.", max_tokens=5)
    shown.answered(q, "by a program")
    shown.ask(q)
    assert out.getvalue().splitlines() == [
        "session s-1 (cot)", "--- q-0 (max_tokens 5) ---", "[system] Be brief.", "What now?",
        "your answer (one line, or <<< then lines then >>>):"]


def test_the_live_bar_makes_way_for_each_prompt_on_a_terminal() -> None:
    shown, out = view(terminal=True)
    shown.session("s-1", "cot")
    for n in range(1, 3):
        shown.waiting()
        shown.update({"progress": {"step": n, "total": 2, "message": f"step {n}"}})
        shown.ask(LlmQuery(f"q-{n}", f"prompt {n}"))
    shown.waiting()
    shown.close()
    text = out.getvalue()
    assert "\x1b[" in text  # a terminal gets the live display
    for n in range(1, 3):
        assert text.count(f"prompt {n}") == 1, text
        assert f"--- q-{n} (max_tokens 1024) · step {n} ---" in text, text
    assert "progress 1/2" not in text  # the bar shows it, not a line


@pytest.fixture
def stdin_pipe() -> Iterator[dict[str, int]]:
    """A pipe as the terminal's input: ``read`` and ``write`` ends; a test that closes one
    removes it (so no file descriptor number is closed twice)."""
    read_end, write_end = os.pipe()
    ends = {"read": read_end, "write": write_end}
    try:
        yield ends
    finally:
        for fd in ends.values():
            os.close(fd)


async def test_the_terminal_reads_lines_and_blocks_and_says_when_input_ended(
    stdin_pipe: dict[str, int],
) -> None:
    asked: list[str] = []
    terminal = Terminal(StdinLines(stdin_pipe["read"]), lambda q: asked.append(q.id))
    os.write(stdin_pipe["write"], b"one line\n<<<\nfirst\r\n  second\n>>>\nhalf")
    assert await terminal.answer(LlmQuery("q-0", "a")) == "one line"
    assert await terminal.answer(LlmQuery("q-1", "b")) == "first\n  second"
    os.close(stdin_pipe.pop("write"))
    assert await terminal.answer(LlmQuery("q-2", "c")) == "half"  # the last, unterminated
    with pytest.raises(ResponderFailed) as info:
        await terminal.answer(LlmQuery("q-3", "d"))
    assert info.value.query_id == "q-3" and "standard input ended" in info.value.message
    assert asked == ["q-0", "q-1", "q-2", "q-3"]
