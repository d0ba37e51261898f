"""``states.MADE_BY`` is what the Lua scripts do, read from the scripts themselves.

Each script is read twice: its code (where it writes ``'phase', '<phase>'``, which phase its
``INVALID_TRANSITION`` guard lets through, and under which mode branch a write sits) and its
``-- Transition(s):`` header line. The two must agree with each other and with the table, so
a script that starts writing a phase the table does not allow, or a table entry no script
makes, fails here. The parser is strict on purpose: a ``'phase'`` it cannot read (a write of a
variable, a guard of a new shape) fails the test rather than being skipped.
"""

from __future__ import annotations

import re
from importlib import resources

import pytest

from coordinator.states import MADE_BY, TERMINAL, TRANSITIONS, Phase, can_transition

Src = Phase | None
Writer = tuple[Src, Phase, str]  # (source, destination, "script.lua" or "script.lua:mode")

SCRIPTS = {p.name: p.read_text(encoding="utf-8")
           for p in resources.files("coordinator.scripts").iterdir() if p.name.endswith(".lua")}
_MODES = re.compile(r"ARGV\[\d+\] \w+: ('\w+'(?:\s*\|\s*'\w+')+)")
_HEADER = re.compile(r"^-- Transitions?: (.*?)\.?$", re.M)
_IF = re.compile(r"(else)?if (.*) then$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _code(line: str) -> str:
    """The line without its comment, stripped (no script has ``--`` in a string)."""
    return line.split("--", 1)[0].strip()


def _modes(text: str) -> set[str | None]:
    """The script's modes, from its header's ``ARGV[n] mode: 'a' | 'b'``; ``{None}``: none."""
    m = _MODES.search(text)
    return set(re.findall(r"'(\w+)'", m.group(1))) if m else {None}


def _tested(cond: str, modes: set[str | None]) -> set[str | None]:
    return set(re.findall(r"== '(\w+)'", cond)) & modes


def _modes_at(lines: list[str], i: int, modes: set[str | None]) -> set[str | None]:
    """The modes under which line ``i`` runs: walk out through the enclosing branches."""
    allowed, indent = set(modes), _indent(lines[i])
    for j in range(i - 1, -1, -1):
        s = _code(lines[j])
        if not s or _indent(lines[j]) >= indent:
            continue
        indent = _indent(lines[j])
        m = _IF.match(s)
        if m and _tested(m.group(2), modes):
            allowed &= _tested(m.group(2), modes)
        if s == "else" or (m and m.group(1)):  # not any mode an earlier branch took
            for k in range(j - 1, -1, -1):
                if _code(lines[k]) and _indent(lines[k]) == indent:
                    if not (sib := _IF.match(_code(lines[k]))):
                        break
                    allowed -= _tested(sib.group(2), modes)
                    if not sib.group(1):
                        break
    return allowed


def _guard(name: str, lines: list[str]) -> tuple[int, frozenset[Src]]:
    """The line of the ``if`` that returns ``INVALID_TRANSITION``, and the phases it lets by."""
    returns = [i for i, line in enumerate(lines) if "return {'INVALID_TRANSITION'" in line]
    if not returns:
        return -1, frozenset({None})
    assert len(returns) == 1, f"{name}: one INVALID_TRANSITION guard expected"
    i = next(j for j in range(returns[0], -1, -1)
             if _code(lines[j]) and _indent(lines[j]) < _indent(lines[returns[0]]))
    cond = _code(lines[i])
    named = frozenset(Phase(p) for p in re.findall(r"'(\w+)'", cond))
    if re.fullmatch(r"if phase ~= '\w+'( and phase ~= '\w+')* then", cond):
        return i, named  # returns unless the phase is one of these
    if re.fullmatch(r"if phase == '\w+'( or phase == '\w+')* then", cond):
        return i, frozenset(Phase) - named  # returns if it is one of these
    raise AssertionError(f"{name}:{i + 1}: guard of an unknown shape: {cond}")


def _refusals(lines: list[str], guard: int,
              modes: set[str | None]) -> dict[str | None, frozenset[Phase]]:
    """Phases a mode turns away after the main guard (``if phase == 'x' then ... return``
    inside that mode's branch, e.g. terminate's expire refusing a running session)."""
    out: dict[str | None, frozenset[Phase]] = {}
    for i, line in enumerate(lines):
        cond = _code(line)
        m = re.fullmatch(r"if phase == '\w+'( or phase == '\w+')* then", cond)
        if i == guard or not m:
            continue
        block = []
        for x in lines[i + 1:]:
            if _code(x) and _indent(x) <= _indent(line):
                break
            block.append(_code(x))
        if not any(b.startswith("return {") for b in block):
            continue
        named = frozenset(Phase(p) for p in re.findall(r"'(\w+)'", cond))
        for mode in _modes_at(lines, i, modes):
            out[mode] = out.get(mode, frozenset()) | named
    return out


def from_code(name: str, text: str) -> set[Writer]:
    lines = text.splitlines()
    modes = _modes(text)
    guard, sources = _guard(name, lines)
    refused = _refusals(lines, guard, modes)
    out: set[Writer] = set()
    for i, line in enumerate(lines):
        code = _code(line)
        if "'phase'" not in code or re.search(r"'HM?GET'", code):
            continue  # no phase here, or a read of it (HGET, HMGET)
        for m in re.finditer(r"'phase'(?:,\s*'(\w+)')?", code):
            where = f"{name}:{i + 1}"
            assert m.group(1) in set(Phase), f"{where}: writes no known phase: {code}"
            assert guard < i, f"{where}: writes the phase before checking it"
            assert sources != {None} or "'phase'" not in re.sub(r"'phase',\s*'\w+'", "", text), (
                f"{name}: reads the phase but has no INVALID_TRANSITION guard")
            for mode in _modes_at(lines, i, modes):
                out |= {(s, Phase(m.group(1)), f"{name}:{mode}" if mode else name)
                        for s in sources - refused.get(mode, frozenset())}
    return out


def from_header(name: str, text: str) -> dict[tuple[Src, Phase], set[str | None] | None]:
    """(source, destination) -> the modes the header names for it, or None if it names none."""
    modes = _modes(text)
    out: dict[tuple[Src, Phase], set[str | None] | None] = {}
    for decl in _HEADER.findall(text):
        lhs, rhs = decl.split("->")
        srcs = {None} if lhs.strip() == "(none)" else {Phase(s.strip()) for s in lhs.split("|")}
        for m in re.finditer(r"(\w+)\s*(?:\(([^)]*)\))?", rhs):
            listed: set[str | None] = {x.strip() for x in (m.group(2) or "").split(",")}
            for s in srcs:  # a pair named on two lines: the modes of both
                key = (s, Phase(m.group(1)))
                before = out.get(key, set()) if key in out else set()
                merged = None if before is None or not listed <= modes else before | listed
                out[key] = merged
    return out


def table() -> set[Writer]:
    return {(s, d, w) for (s, d), writers in MADE_BY.items() for w in writers}


def test_scripts_write_exactly_the_transitions_of_the_table() -> None:
    code = set().union(*(from_code(n, t) for n, t in SCRIPTS.items()))
    assert sorted(code - table(), key=str) == [], "written by a script, missing from MADE_BY"
    assert sorted(table() - code, key=str) == [], "in MADE_BY, made by no script"


def header_disagreements(name: str, text: str) -> list[str]:
    code, header = from_code(name, text), from_header(name, text)
    out = [f"header {s} -> {d}, code does not" for s, d in set(header) - {c[:2] for c in code}]
    out += [f"code {s} -> {d}, header does not" for s, d in {c[:2] for c in code} - set(header)]
    for (s, d), modes in header.items():
        made = {w for s2, d2, w in code if (s2, d2) == (s, d)}
        named = {f"{name}:{m}" for m in modes or ()}
        if modes is not None and named != made:
            out.append(f"{s} -> {d}: header names {sorted(named)}, code {sorted(made)}")
    return out


@pytest.mark.parametrize(("script", "old", "new"), [
    ("feed.lua", "'phase', 'running'", "'phase', 'completed'"),  # a new destination
    ("feed.lua", "phase ~= 'paused'", "phase ~= 'running'"),  # a new source
    ("terminate.lua", "or phase == 'cancelled' then", "then"),  # cancelled -> cancelled
    ("terminate.lua", "ARGV[2] == 'fail' then", "ARGV[2] == 'cancel' then"),  # mode swapped
    ("commit_step.lua", "outcome == 'complete'", "outcome == 'fail'"),  # mode swapped
    ("create.lua", "'phase', 'running'", "'phase', 'paused'"),
    ("terminate.lua", "return {'BUSY'}", "now = now"),  # expire would fail a running one
])
def test_a_changed_script_is_caught(script: str, old: str, new: str) -> None:
    assert SCRIPTS[script].count(old) == 1, (script, old)
    mutated = {**SCRIPTS, script: SCRIPTS[script].replace(old, new)}
    assert set().union(*(from_code(n, t) for n, t in mutated.items())) != table()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_header_agrees_with_code(name: str) -> None:
    assert header_disagreements(name, SCRIPTS[name]) == []


@pytest.mark.parametrize(("script", "old", "new"), [
    ("feed.lua", "Transition: paused -> running", "Transition: paused -> completed"),
    ("create.lua", "(none) -> running", "paused -> running"),
    ("terminate.lua", "cancelled (cancel), failed (fail)",
     "cancelled (cancel, fail), failed (expire)"),
    ("terminate.lua", "paused -> failed (expire)", "running | paused -> failed (expire)"),
    ("commit_step.lua", "paused | completed | failed", "paused | completed"),
])
def test_a_changed_header_is_caught(script: str, old: str, new: str) -> None:
    assert SCRIPTS[script].count(old) == 1, (script, old)
    assert header_disagreements(script, SCRIPTS[script].replace(old, new)) != []


def test_a_phase_written_from_a_variable_is_refused() -> None:
    text = SCRIPTS["feed.lua"].replace("'phase', 'running'", "'phase', ARGV[1]")
    with pytest.raises(AssertionError, match="writes no known phase"):
        from_code("feed.lua", text)


EXPECTED = {
    (None, Phase.RUNNING),
    (Phase.RUNNING, Phase.PAUSED), (Phase.RUNNING, Phase.COMPLETED),
    (Phase.RUNNING, Phase.FAILED), (Phase.RUNNING, Phase.CANCELLED),
    (Phase.PAUSED, Phase.RUNNING), (Phase.PAUSED, Phase.FAILED),
    (Phase.PAUSED, Phase.CANCELLED),
}


@pytest.mark.parametrize("src", [None, *Phase])
@pytest.mark.parametrize("dst", list(Phase))
def test_can_transition_every_pair(src: Src, dst: Phase) -> None:
    assert can_transition(src, dst) is ((src, dst) in EXPECTED)
    if src is not None:
        assert (dst in TRANSITIONS[src]) is can_transition(src, dst)
        assert not (src in TERMINAL and can_transition(src, dst))
