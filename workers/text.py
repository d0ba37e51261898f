"""Reading what a model answered: JSON, numbers, scores, verdicts, votes.

Pure functions, the Python side of upstream algocline's ``alc.json_extract``,
``alc.parse_number``, ``alc.parse_score``, ``alc.vote``, ``alc.match_enum`` and
``alc.match_bool`` (its ``prelude.lua`` and ``bridge/fuzzy.rs``), so strategies ported from
upstream's packages read answers exactly as the Lua ones did. They hold no state and ask
nothing, so a strategy may call them freely: a replay computes the same values.

Where we differ from upstream, on purpose:
- ``parse_score`` returns None for text with no number (upstream returns a default, 5):
  ``parse_score(text) or 5.0`` says the same, and a caller can tell "no score" apart.
  It reads decimals and clamps to ``[lo, hi]`` (upstream: the first integer, into 1..10).
- ``vote`` counts ``normalise``d answers (trimmed, inner whitespace collapsed, trailing
  ``.!?,;:`` dropped, lower-cased: upstream's ``sc`` package's ``normalize_for_vote``),
  where ``alc.vote`` only trims.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from coordinator.errors import InvalidInput

__all__ = [
    "clean",
    "jaro_winkler",
    "json_extract",
    "match_bool",
    "match_enum",
    "normalise",
    "parse_number",
    "parse_score",
    "vote",
]

# Lua's ``.-`` is lazy and ``.`` crosses lines: DOTALL with ``*?``.
_FENCE_JSON = re.compile(r"```json\s*(.*?)\s*```", re.DOTALL)
_FENCE_ANY = re.compile(r"```\s*(.*?)\s*```", re.DOTALL)
# Lua's ``%-?%d+%.?%d*``; ASCII digits only, as Lua's %d.
_NUMBER = re.compile(r"-?[0-9]+\.?[0-9]*")
_TRAILING_PUNCT = re.compile(r"[.!?,;:]+$")
_SPACES = re.compile(r"\s+")

_TRUE_WORDS = ("approved", "yes", "ok", "accept", "pass", "confirm", "agree", "true", "lgtm")
_FALSE_WORDS = ("rejected", "no", "deny", "block", "fail", "refuse", "disagree", "false")


# --- JSON -------------------------------------------------------------------------------


def json_extract(raw: str) -> Any | None:
    """The JSON object or array in a model's answer, or None.

    Three stages, as upstream: the whole text; the body of the first ```json fence (else of
    the first plain ``` fence); then each balanced ``{...}`` and, failing those, each
    balanced ``[...]``, left to right. Only an object or an array counts: a bare ``42`` or
    ``"yes"`` is not what a strategy asking for JSON wanted. NaN and Infinity are refused,
    since the result must stay JSON-able to be stored.
    """
    if not isinstance(raw, str):
        return None
    found = _decode_container(raw)
    if found is not None:
        return found
    fence = _FENCE_JSON.search(raw) or _FENCE_ANY.search(raw)
    if fence is not None:
        found = _decode_container(fence.group(1))
        if found is not None:
            return found
    for open_, close in (("{", "}"), ("[", "]")):
        for candidate in _balanced(raw, open_, close):
            found = _decode_container(candidate)
            if found is not None:
                return found
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode_container(text: str) -> dict[str, Any] | list[Any] | None:
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict | list) else None


def _balanced(text: str, open_: str, close: str) -> Iterator[str]:
    """Lua's ``gmatch("%b" .. open_ .. close)``: balanced spans, left to right, not
    overlapping; quotes are not special (a brace inside a JSON string counts, as in Lua)."""
    i, n = 0, len(text)
    while i < n:
        if text[i] != open_:
            i += 1
            continue
        depth = 0
        end = -1
        for j in range(i, n):
            if text[j] == open_:
                depth += 1
            elif text[j] == close:
                depth -= 1
                if depth == 0:
                    end = j
                    break
        if end < 0:
            i += 1
            continue
        yield text[i:end + 1]
        i = end + 1


# --- numbers ----------------------------------------------------------------------------


def parse_number(text: Any, pattern: str | None = None) -> float | None:
    """The first number in ``text`` (``-3``, ``7.5``), or None.

    ``pattern``, a regular expression with one group, picks which number instead
    (``r"(\\d+)\\s+subtask"``), as upstream's Lua pattern argument does.
    """
    if not isinstance(text, str):
        return None
    if pattern is not None:
        found = re.search(pattern, text)
        if found is None:
            return None
        return _to_float(found.group(1) if found.groups() else found.group(0))
    found = _NUMBER.search(text)
    return None if found is None else _to_float(found.group(0))


def _to_float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text.strip())
    except ValueError:
        return None


def parse_score(text: Any, lo: float = 0.0, hi: float = 10.0) -> float | None:
    """The first number in ``text``, clamped to ``[lo, hi]``; None when there is none."""
    if lo > hi:
        raise InvalidInput(f"parse_score: lo ({lo}) is above hi ({hi})")
    value = parse_number(text)
    if value is None:
        return None
    return min(hi, max(lo, value))


# --- votes ------------------------------------------------------------------------------


def clean(answer: Any) -> str:
    """An answer as shown: trimmed, inner whitespace collapsed, trailing ``.!?,;:`` dropped,
    its case kept (upstream's ``sc`` ``clean_answer``; non-strings read as "")."""
    if not isinstance(answer, str):
        return ""
    return _TRAILING_PUNCT.sub("", _SPACES.sub(" ", answer.strip()))


def normalise(answer: Any) -> str:
    """An answer as counted in a vote: ``clean``, then lower-cased, so "Tokyo." and
    " tokyo" are one answer."""
    return clean(answer).lower()


def vote(answers: Sequence[str]) -> tuple[str, dict[str, int]]:
    """The majority answer (its ``normalise``d form) and every normalised answer's count,
    in first-seen order; a tie goes to the answer seen first."""
    if isinstance(answers, str) or not answers:
        raise InvalidInput("vote takes a non-empty list of answers")
    counts: dict[str, int] = {}
    for answer in answers:
        key = normalise(answer)
        counts[key] = counts.get(key, 0) + 1
    winner = max(counts, key=counts.__getitem__)  # max keeps the first of equals
    return winner, counts


# --- verdicts ---------------------------------------------------------------------------


def match_enum(text: Any, choices: Sequence[str], threshold: float = 0.7) -> str | None:
    """Which of ``choices`` the answer names, or None.

    Upstream's ``alc.match_enum``: a choice appearing in the text (any case) wins, the one
    whose last appearance is latest when several do (models state conclusions last; on a
    tie the earlier choice). Failing that, each word of the text (stripped of surrounding
    punctuation) is compared with each choice by Jaro-Winkler similarity, and the most
    similar pair at or above ``threshold`` (default 0.7, upstream's) wins: "BLOKED" reads
    as "BLOCKED".
    """
    if not isinstance(text, str) or isinstance(choices, str):
        return None
    options = [c for c in choices if isinstance(c, str) and c]
    lower = text.lower()
    best: tuple[int, str] | None = None
    for choice in options:
        pos = lower.rfind(choice.lower())
        if pos >= 0 and (best is None or pos > best[0]):
            best = (pos, choice)
    if best is not None:
        return best[1]
    fuzzy: tuple[float, str] | None = None
    for token in lower.split():
        word = _strip_non_alnum(token)
        if not word:
            continue
        for choice in options:
            sim = jaro_winkler(word, choice.lower())
            if sim >= threshold and (fuzzy is None or sim > fuzzy[0]):
                fuzzy = (sim, choice)
    return None if fuzzy is None else fuzzy[1]


def _strip_non_alnum(token: str) -> str:
    start, end = 0, len(token)
    while start < end and not token[start].isalnum():
        start += 1
    while end > start and not token[end - 1].isalnum():
        end -= 1
    return token[start:end]


def match_bool(text: Any) -> bool | None:
    """Yes or no, from a model's verdict; None when it says neither.

    Upstream's ``alc.match_bool``: the last whole-word keyword decides ("No issues found.
    Approved." is yes); "pass" inside "bypass" or "fail" inside "failed" is no keyword.
    """
    if not isinstance(text, str):
        return None
    lower = text.lower()
    last: tuple[int, bool] | None = None
    for words, verdict in ((_TRUE_WORDS, True), (_FALSE_WORDS, False)):
        for word in words:
            for pos in _whole_word_positions(lower, word):
                if last is None or pos > last[0]:
                    last = (pos, verdict)
    return None if last is None else last[1]


def _whole_word_positions(text: str, word: str) -> Iterator[int]:
    start = 0
    while (pos := text.find(word, start)) >= 0:
        if _boundary(text, pos - 1) and _boundary(text, pos + len(word)):
            yield pos
        start = pos + 1


def _boundary(text: str, pos: int) -> bool:
    """Upstream checks bytes: only an ASCII letter or digit joins a word."""
    if pos < 0 or pos >= len(text):
        return True
    char = text[pos]
    return not (char.isascii() and char.isalnum())


# --- similarity -------------------------------------------------------------------------


def jaro_winkler(a: str, b: str) -> float:
    """Jaro-Winkler similarity in [0, 1] as the Rust ``strsim`` crate computes it (the
    prefix bonus only above 0.7, over at most 4 characters), so fuzzy matches agree with
    upstream's."""
    sim = _jaro(a, b)
    if sim <= 0.7:
        return sim
    prefix = 0
    for x, y in zip(a[:4], b, strict=False):
        if x != y:
            break
        prefix += 1
    return sim + 0.1 * prefix * (1.0 - sim)


def _jaro(a: str, b: str) -> float:
    if not a and not b:
        return 1.0
    if not a or not b:
        return 0.0
    search = max(0, max(len(a), len(b)) // 2 - 1)
    a_hit = [False] * len(a)
    b_hit = [False] * len(b)
    matches = 0
    for i, char in enumerate(a):
        for j in range(max(0, i - search), min(len(b), i + search + 1)):
            if not b_hit[j] and b[j] == char:
                a_hit[i] = b_hit[j] = True
                matches += 1
                break
    if matches == 0:
        return 0.0
    in_b = (c for c, hit in zip(b, b_hit, strict=True) if hit)
    in_a = (c for c, hit in zip(a, a_hit, strict=True) if hit)
    transpositions = sum(x != y for x, y in zip(in_a, in_b, strict=True)) // 2
    return (matches / len(a) + matches / len(b)
            + (matches - transpositions) / matches) / 3.0
