"""The README's reference tables say what the code does: the error vocabulary (type, meaning,
CLI exit code, HTTP status) and the failure types are copies of ``coordinator.errors``'s, and
drift is a test failure, not a surprise for a user reading them."""

from __future__ import annotations

import re
from pathlib import Path

from coordinator.errors import FAILURE_TYPES, vocabulary

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _section(name: str) -> str:
    match = re.search(rf"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", README, re.S)
    assert match, f"README.md has no {name} table between its markers"
    return match.group(1)


def test_the_error_table_is_the_code_s() -> None:
    rows = [line.split(" | ") for line in _section("errors").splitlines()[2:]]
    listed = {r[0].strip("| `"): (r[1], int(r[2]), int(r[3].rstrip(" |"))) for r in rows}
    expected = {code: (meaning, exit_code, status)
                for code, meaning, exit_code, status in vocabulary() if code != "session_error"}
    assert listed == expected


def test_every_failure_type_is_documented() -> None:
    rows = [line.split(" | ") for line in _section("failures").splitlines()[2:]]
    assert {r[0].strip("| `"): r[1].rstrip(" |") for r in rows} == FAILURE_TYPES


def test_each_error_class_has_a_distinct_code() -> None:
    codes = [code for code, *_ in vocabulary()]
    assert len(codes) == len(set(codes))
