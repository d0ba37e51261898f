"""Who answers the prompts when ``coordinator run`` plays the host.

- ``terminal``: a person types the answer (one line, or ``<<<`` ... ``>>>`` for several);
- ``echo``: the answer is the prompt itself (a pure function of the prompt: reproducible);
- ``cmd:SHELL COMMAND``: the command gets the prompt on stdin (and ``ALC_QUERY_ID``,
  ``ALC_SYSTEM``, ``ALC_MAX_TOKENS`` in its environment) and prints the answer.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable

from .errors import InvalidInput, SessionError
from .models import LlmQuery

Responder = Callable[[LlmQuery], Awaitable[str]]

CMD_TIMEOUT_S = 600.0


def make_responder(spec: str) -> Responder:
    if spec == "echo":
        return _echo
    if spec == "terminal":
        return _terminal
    if spec.startswith("cmd:") and spec[4:].strip():
        return _command(spec[4:].strip())
    raise InvalidInput(f"unknown responder {spec!r}: use terminal, echo or 'cmd:SHELL COMMAND'")


async def _echo(q: LlmQuery) -> str:
    return q.prompt


async def _terminal(q: LlmQuery) -> str:
    def read() -> str:
        print(f"\n--- {q.id} (max_tokens {q.max_tokens}) ---", file=sys.stderr)
        if q.system:
            print(f"[system] {q.system}", file=sys.stderr)
        print(q.prompt, file=sys.stderr)
        print("your answer (one line, or <<< then lines then >>>):", file=sys.stderr)
        first = sys.stdin.readline()
        if not first:
            raise SessionError("stdin closed before an answer was given")
        if first.strip() != "<<<":
            return first.rstrip("\n")
        lines = []
        for line in sys.stdin:
            if line.strip() == ">>>":
                break
            lines.append(line.rstrip("\n"))
        return "\n".join(lines)

    return await asyncio.to_thread(read)


def _command(cmd: str) -> Responder:
    async def run(q: LlmQuery) -> str:
        env = {**os.environ, "ALC_QUERY_ID": q.id, "ALC_SYSTEM": q.system or "",
               "ALC_MAX_TOKENS": str(q.max_tokens)}
        proc = await asyncio.create_subprocess_shell(
            cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(q.prompt.encode()), CMD_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            raise SessionError(f"responder command timed out after {CMD_TIMEOUT_S:g} s") from None
        if proc.returncode != 0:
            raise SessionError(
                f"responder command exited with {proc.returncode}: "
                f"{err.decode(errors='replace').strip()[-500:]}"
            )
        return out.decode("utf-8", errors="replace").rstrip("\n")

    return run
