"""workers.text: reading answers as upstream's alc.* helpers do (cases from upstream's tests)."""

from __future__ import annotations

import pytest

from coordinator.errors import InvalidInput
from workers.text import (
    clean,
    jaro_winkler,
    json_extract,
    match_bool,
    match_enum,
    normalise,
    parse_number,
    parse_score,
    vote,
)


class TestJsonExtract:
    def test_whole_text(self) -> None:
        assert json_extract(' {"a": 1, "b": [true, null]} ') == {"a": 1, "b": [True, None]}
        assert json_extract("[1, 2]") == [1, 2]

    def test_json_fence_first(self) -> None:
        raw = 'Here it is:\n```json\n{"x": "y"}\n```\nand ```\n{"z": 1}\n```'
        assert json_extract(raw) == {"x": "y"}

    def test_plain_fence_when_no_json_fence(self) -> None:
        assert json_extract('Sure.\n```\n["a", "b"]\n```') == ["a", "b"]

    def test_first_balanced_object_that_parses(self) -> None:
        raw = 'Thinking {not json} then {"answer": {"n": 2}} and {"later": 3}'
        assert json_extract(raw) == {"answer": {"n": 2}}

    def test_objects_before_arrays(self) -> None:
        assert json_extract('list [1, 2] then obj {"k": 0}') == {"k": 0}
        assert json_extract("only a list: [1, [2, 3]] done") == [1, [2, 3]]

    def test_scalars_and_garbage_are_none(self) -> None:
        for raw in ("42", '"yes"', "true", "no json here", "{unclosed", "", "{'a': 1}"):
            assert json_extract(raw) is None, raw

    def test_nan_refused_and_non_str_is_none(self) -> None:
        assert json_extract('{"a": NaN}') is None
        assert json_extract('{"a": NaN} {"b": 1}') == {"b": 1}
        assert json_extract(None) is None  # type: ignore[arg-type]


class TestNumbers:
    @pytest.mark.parametrize(("text", "want"), [
        ("Found 3 subtasks", 3.0), ("Score: 7.5/10", 7.5), ("delta -2 points", -2.0),
        ("no numbers here", None), ("3. Done", 3.0), ("", None),
    ])
    def test_parse_number(self, text: str, want: float | None) -> None:
        assert parse_number(text) == want

    def test_parse_number_pattern_and_non_str(self) -> None:
        assert parse_number("step 1: found 4 subtasks", r"(\d+)\s+subtask") == 4.0
        assert parse_number("nothing", r"(\d+)\s+subtask") is None
        assert parse_number(12) is None

    def test_parse_score_clamps(self) -> None:
        assert parse_score("I'd say 8.5") == 8.5
        assert parse_score("14 out of 10!") == 10.0
        assert parse_score("-3") == 0.0
        assert parse_score("rating: 4", lo=1.0, hi=5.0) == 4.0
        assert parse_score("rating: 9", lo=1.0, hi=5.0) == 5.0
        assert parse_score("no score") is None
        with pytest.raises(InvalidInput):
            parse_score("3", lo=5.0, hi=1.0)


class TestVote:
    def test_normalise_and_clean(self) -> None:
        assert clean("  Tokyo,  Japan.!  ") == "Tokyo, Japan"
        assert normalise("  Tokyo,  Japan.!  ") == "tokyo, japan"
        assert normalise(None) == ""

    def test_majority_of_normalised(self) -> None:
        winner, counts = vote(["Paris", "tokyo.", " Tokyo", "paris!", "TOKYO"])
        assert winner == "tokyo"
        assert counts == {"paris": 2, "tokyo": 3}
        assert list(counts) == ["paris", "tokyo"]  # first-seen order

    def test_tie_goes_to_first_seen(self) -> None:
        assert vote(["b", "a", "a", "b"])[0] == "b"
        assert vote(["x"]) == ("x", {"x": 1})

    def test_empty_refused(self) -> None:
        with pytest.raises(InvalidInput):
            vote([])
        with pytest.raises(InvalidInput):
            vote("abc")


class TestMatchEnum:
    def test_substring_any_case_last_wins(self) -> None:
        assert match_enum("Verdict: BLOCKED. Fix the issues.", ["PASS", "BLOCKED"]) == "BLOCKED"
        assert match_enum("verdict: pass. all good.", ["PASS", "BLOCKED"]) == "PASS"
        assert match_enum("Initially BLOCKED, but after review: PASS",
                          ["PASS", "BLOCKED"]) == "PASS"

    def test_fuzzy_fallback(self) -> None:
        assert match_enum("BLOKED", ["PASS", "BLOCKED"]) == "BLOCKED"
        long = ("After careful review of all the evidence and considering multiple factors, "
                "the final verdict is BLCKED due to missing tests.")
        assert match_enum(long, ["PASS", "BLOCKED"]) == "BLOCKED"

    def test_none_when_nothing_close(self) -> None:
        assert match_enum("The weather is nice today", ["PASS", "BLOCKED"]) is None
        assert match_enum("anything", []) is None
        assert match_enum("BLOKED", ["PASS", "BLOCKED"], threshold=0.99) is None

    def test_jaro_winkler_values(self) -> None:
        assert jaro_winkler("cheeseburger", "cheese fries") == pytest.approx(0.866, abs=1e-3)
        assert jaro_winkler("abc", "abc") == 1.0
        assert jaro_winkler("", "") == 1.0
        assert jaro_winkler("abc", "") == 0.0
        assert jaro_winkler("abc", "xyz") == 0.0


class TestMatchBool:
    @pytest.mark.parametrize(("text", "want"), [
        ("Approved. The plan looks good.", True),
        ("rejected: missing test coverage", False),
        ("I need more information about the design", None),
        ("No issues found. Approved.", True),
        ("Looks fine, yes... actually no.", False),
        ("This is a broken token", None),
        ("We need to bypass the filter", None),
        ("Great innovation in technology", None),
        ("yes, that works", True),
        ("The process failed gracefully", None),
        ("LGTM", True),
    ])
    def test_last_whole_word_decides(self, text: str, want: bool | None) -> None:
        assert match_bool(text) is want

    def test_non_str(self) -> None:
        assert match_bool(None) is None
