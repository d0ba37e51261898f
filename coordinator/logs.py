"""Log lines an operator can use: every line about a session names it, in the text and as a
field, and ``--log-format json`` gives log shippers one JSON object per line.

The convention: a line about a session passes ``extra=about(sid, worker_id)``, so the record
carries ``session_id`` (and ``worker_id``) as attributes; the formatters below put them where
a reader looks for them. A failure passes ``exc_info`` (the strategy's exception, its
traceback trimmed to the strategy's own frames by the worker), which the JSON formatter
emits as ``traceback``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

__all__ = ["FORMATS", "JsonFormatter", "TextFormatter", "about", "configure_logging"]

#: What ``configure_logging`` (and ``--log-format``) takes.
FORMATS = ("text", "json")
#: The record attributes that name what a line is about, in the order they are shown.
CONTEXT_FIELDS = ("session_id", "worker_id")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def about(session_id: str | None = None, worker_id: str | None = None) -> dict[str, str]:
    """``extra`` for a log call about a session (and the worker that speaks)."""
    out: dict[str, str] = {}
    if session_id is not None:
        out["session_id"] = session_id
    if worker_id is not None:
        out["worker_id"] = worker_id
    return out


class TextFormatter(logging.Formatter):
    """A readable line; a session id the message does not show already is appended, so
    ``grep SESSION_ID`` finds every line about it."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        sid = getattr(record, "session_id", None)
        if sid and sid not in record.getMessage():
            head, sep, tail = line.partition("\n")  # before a traceback, if any
            line = f"{head} [session {sid}]{sep}{tail}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO-8601, UTC, ms), ``level``, ``logger``,
    ``message``, ``session_id`` / ``worker_id`` when known, ``traceback`` with ``exc_info``
    (newlines inside strings are escaped, so a traceback never splits a line)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = str(value)
        if record.exc_info and record.exc_info[0] is not None:
            out["traceback"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["traceback"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")


def configure_logging(level: str, fmt: str = "text", *, stream: TextIO | None = None) -> None:
    """Send every logger's records at ``level`` or above to ``stream`` (stderr) in ``fmt``.
    Replaces the root logger's handlers, so calling it again changes the format rather than
    doubling every line."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Python's warnings too, as records: a stray line on stderr would break a JSON stream.
    logging.captureWarnings(True)
