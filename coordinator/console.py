"""What the CLI shows people: the live view of ``coordinator run``, and the tables of
``status``, ``sessions`` and ``strategies``.

Rendering is rich's: it knows whether stderr is a terminal, so a person watching gets a
live progress bar and colours while a captured stderr (a log file, a CI job) gets plain
lines with no control codes. Whatever a strategy wrote (a log line, a prompt, a progress
message) is shown as text, never read as rich markup, and is never wrapped: a terminal
wraps long lines itself, and a log file keeps them whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from .models import LlmQuery
from .records import server_now_ms
from .states import Phase

#: The phases in the order a listing names them.
PHASES = tuple(p.value for p in Phase)
#: How much of a prompt or answer a one-line summary shows.
CLIP = 160
_LOG_STYLES = {"debug": "dim", "info": "", "warn": "yellow", "warning": "yellow",
               "error": "bold red"}


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


#: The width of tables written to a pipe or a file: room for every id on one line.
PIPE_WIDTH = 160


def stdout_console() -> Console:
    """Tables on stdout: as wide as the terminal, or ``PIPE_WIDTH`` when piped (rich's 80
    would cut session ids, and a cut id is of no use to ``grep``). Ids, names and phases
    never wrap; descriptions and prompts do."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=PIPE_WIDTH)
    return console


def clip(text: str, limit: int = CLIP) -> str:
    """One line of at most ``limit`` characters."""
    one = " / ".join(part for part in text.splitlines() if part.strip()) or text.strip()
    return one if len(one) <= limit else one[: limit - 1] + "…"


class RunView:
    """``coordinator run`` as a person sees it on stderr: the session's id at once, its
    log lines as they come (each once, by ``seq``), its progress (a live bar on a terminal,
    a line per change elsewhere), each prompt once, and what non-interactive responders
    answered. ``quiet`` (``--json``) keeps only the session's id and the prompts a person
    must see to answer."""

    def __init__(self, *, quiet: bool = False, console: Console | None = None) -> None:
        self.console = console or stderr_console()
        self.quiet = quiet
        self._live = self.console.is_terminal and not self.console.is_dumb_terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last_seq = 0
        self._last_progress: dict[str, Any] | None = None

    # -- what happened -----------------------------------------------------------------

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(Text(message, style="dim"))

    def session(self, sid: str, strategy: str) -> None:
        """Always shown, even when quiet: without it an interrupted run's session is lost."""
        self.console.print(Text(f"session {sid} ({strategy})"))

    def update(self, metrics: Mapping[str, Any]) -> None:
        """A fresh snapshot's ``metrics``: show what is new in it."""
        if self.quiet:
            return
        logs = [e for e in metrics.get("recent_logs") or () if isinstance(e, dict)]
        for entry in sorted(logs, key=lambda e: int(e.get("seq") or 0)):
            seq = int(entry.get("seq") or 0)
            if seq > self._last_seq:
                self._last_seq = seq
                self._log(entry)
        progress = metrics.get("progress")
        if isinstance(progress, dict) and progress != self._last_progress:
            self._last_progress = progress
            self._show_progress(progress)

    def _log(self, entry: Mapping[str, Any]) -> None:
        level = str(entry.get("level", "info"))
        line = Text("  log ", style="dim")
        line.append(f"[{level}] ", style=_LOG_STYLES.get(level, ""))
        line.append(str(entry.get("message", "")))
        self.console.print(line)

    def _show_progress(self, progress: Mapping[str, Any]) -> None:
        step, total = int(progress.get("step") or 0), int(progress.get("total") or 0)
        message = str(progress.get("message") or "")
        if not self._live:
            self.console.print(Text(f"  progress {step}/{total}" +
                                    (f" {message}" if message else ""), style="cyan"))
            return
        bar = self._bar()
        if self._task is None:
            self._task = bar.add_task(message, total=total or None, completed=step)
        else:
            bar.update(self._task, description=message, total=total or None,
                       completed=step)

    def _bar(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}", markup=False),
                BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=self.console, transient=True,
                redirect_stdout=False, redirect_stderr=False)
        return self._progress

    # -- the live bar: shown while the session runs, hidden while a person types ----------

    def waiting(self) -> None:
        if self._live and not self.quiet:
            bar = self._bar()
            if self._task is None:
                self._task = bar.add_task("running", total=None)
            bar.start()

    def _pause_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()

    # -- prompts and answers -----------------------------------------------------------

    def ask(self, q: LlmQuery) -> None:
        """The prompt in full, for the person about to type its answer (shown even when
        quiet: they cannot answer what they cannot read)."""
        self._pause_bar()
        head = f"--- {q.id} (max_tokens {q.max_tokens})"
        if self._last_progress and self._last_progress.get("message"):
            head += f" · {self._last_progress['message']}"
        self.console.print(Text(head + " ---", style="bold"))
        if q.system:
            self.console.print(Text(f"[system] {q.system}", style="dim"))
        self.console.print(Text(q.prompt))
        self.console.print(Text(
            "your answer (one line, or <<< then lines then >>>):", style="bold green"))

    def answered(self, q: LlmQuery, answer: str) -> None:
        """What a program answered (a person's own typing is not echoed back)."""
        if self.quiet:
            return
        line = Text(f"  {q.id} ", style="bold")
        line.append(clip(q.prompt, CLIP // 2))
        line.append(" -> ", style="dim")
        line.append(clip(answer, CLIP // 2))
        self.console.print(line)

    def close(self) -> None:
        self._pause_bar()


# -- tables ------------------------------------------------------------------------------

def counts_line(counts: Mapping[str, int], waiting_for_worker: int = 0) -> Text:
    """``sessions: running 2 (1 waiting for a worker), paused 5, ...``."""
    parts = []
    for phase in PHASES:
        part = f"{phase} {counts.get(phase, 0)}"
        if phase == "running" and waiting_for_worker:
            part += f" ({waiting_for_worker} waiting for a worker)"
        parts.append(part)
    return Text("sessions: " + ", ".join(parts))


def _ago(ms: object, now: int) -> str:
    if not isinstance(ms, int):
        return "-"
    seconds = max(0.0, now - ms) / 1000
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _phase(snap: Mapping[str, Any]) -> str:
    phase = str(snap.get("phase", "?"))
    if phase == "running" and snap.get("waiting_for_worker"):
        return "running (waiting for a worker)"
    if phase == "failed" and snap.get("error_type"):
        return f"failed ({snap['error_type']})"
    return phase


def sessions_table(snaps: Iterable[Mapping[str, Any]]) -> Table:
    """One row per snapshot (each carries its ``session_id``), in the order given."""
    now = server_now_ms()  # activity is stamped on Redis's clock
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("SESSION", no_wrap=True)
    table.add_column("STRATEGY", no_wrap=True)
    table.add_column("PHASE", no_wrap=True)
    for name in ("ROUND", "PENDING", "CALLS", "IDLE"):
        table.add_column(name, justify="right", no_wrap=True)
    for s in snaps:
        m = s.get("metrics") or {}
        table.add_row(
            Text(str(s.get("session_id", "?"))), Text(str(s.get("strategy", "?"))),
            Text(_phase(s)), str(s.get("round", "-")), str(s.get("pending_queries", "-")),
            str(m.get("llm_calls", "-")), _ago(s.get("last_activity_at"), now))
    return table


def session_details(snaps: Iterable[Mapping[str, Any]]) -> list[Text]:
    """Under a table: the pending queries (``--pending``) and recent exchanges
    (``--history``) of each session that has them."""
    lines: list[Text] = []
    for s in snaps:
        # algocline keeps the history in ``metrics``; read it there or beside it
        pending = s.get("pending")
        history = (s.get("metrics") or {}).get("conversation_history") \
            or s.get("conversation_history")
        if not pending and not history:
            continue
        lines.append(Text(f"{s.get('session_id')}:", style="bold"))
        for p in pending or ():
            line = Text(f"  pending {p.get('query_id')} (max_tokens {p.get('max_tokens')})")
            prompt = p.get("prompt", p.get("prompt_preview"))
            if prompt is not None:
                line.append(": " + (str(prompt) if "prompt" in p else clip(str(prompt))))
            lines.append(line)
        for h in history or ():
            lines.append(Text(f"  asked {h.get('query_id')}: {clip(str(h.get('prompt')))}"))
            lines.append(Text(f"    answer: {clip(str(h.get('response')))}"))
    return lines


def _param(p: Mapping[str, Any]) -> str:
    out = str(p.get("name"))
    if p.get("annotation"):
        out += f": {p['annotation']}"
    if not p.get("required"):
        out += f" = {json.dumps(p.get('default'), ensure_ascii=False)}"
    return out


def strategies_table(strategies: Iterable[Mapping[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("STRATEGY", no_wrap=True)
    table.add_column("WORKERS", justify="right", no_wrap=True)
    table.add_column("INPUT")
    table.add_column("DESCRIPTION")
    for s in strategies:
        params = [p for p in s.get("params") or () if isinstance(p, dict)]
        table.add_row(Text(str(s.get("name"))), str(s.get("workers", "?")),
                      Text(", ".join(_param(p) for p in params) or "-"),
                      Text(str(s.get("description") or "-")))
    return table


def workers_text(stats: dict[str, dict[str, Any]]) -> str:
    """Live workers, one line each from its last heartbeat's report."""
    now = server_now_ms()  # heartbeats are stamped on Redis's clock
    lines = [f"\nworkers: {len(stats)}"]
    for wid, r in sorted(stats.items()):
        if not r:
            lines.append(f"  {wid}  (its report does not decode)")
            continue
        lines.append(
            f"  {wid}  heartbeat {max(0.0, now - r.get('at', now)) / 1000:.1f} s ago, "
            f"busy {r.get('busy', '?')}/{r.get('concurrency', '?')}, live {r.get('live', '?')}; "
            f"steps {r.get('steps', '?')} (replays {r.get('replays', '?')}, "
            f"claimed {r.get('claimed', '?')}, fenced {r.get('fenced_rejections', '?')}, "
            f"errors {r.get('step_errors', '?')}, dead letters {r.get('dead_letters', '?')})")
    return "\n".join(lines)


def dead_letters_text(total: int, newest: Iterable[Mapping[str, str]]) -> str:
    lines = [f"\ndead letters: {total}"]
    lines += [f"  {d.get('sid') or '-'}  {d.get('reason')}: {d.get('error', '')[:120]}"
              for d in newest]
    return "\n".join(lines)
