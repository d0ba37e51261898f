"""Pure-value tests: query ids, queries, pending filters, the algocline JSON shapes, session
ids, the error tree, the phase table, key names, the pause events and the codec checks."""

from __future__ import annotations

import re
import time
from typing import Any

import msgpack
import pytest

from coordinator import errors
from coordinator.codec import check_json_able, check_text, estimate_tokens, pack, unpack
from coordinator.events import parse_pause, pause_event
from coordinator.keys import Keys
from coordinator.models import (
    PREVIEW_CHARS,
    Accepted,
    FeedResult,
    Finished,
    LlmQuery,
    Paused,
    PendingFilter,
    QueryId,
)
from coordinator.registry import new_session_id
from coordinator.settings import Settings
from coordinator.states import TERMINAL, TRANSITIONS, Phase, can_transition

SID = "s-1-00000000000000000000000000000000"

# -- QueryId --------------------------------------------------------------------------------


def test_query_id_helpers_build_the_documented_ids() -> None:
    assert QueryId.single() == "q-0"
    assert [QueryId.batch(i) for i in range(3)] == ["q-0", "q-1", "q-2"]
    assert QueryId.fork(2, 7) == "f-2-7"


def test_query_id_is_a_plain_str_for_hosts() -> None:
    qid = QueryId.batch(12)
    assert isinstance(qid, str)
    assert qid == "q-12"
    assert {qid: 1}["q-12"] == 1  # hashes like the plain string
    assert f"{qid}" == "q-12"
    assert QueryId.single() == QueryId.batch(0)


# -- LlmQuery -------------------------------------------------------------------------------


def test_llm_query_record_keeps_only_set_optionals() -> None:
    q = LlmQuery(id="q-0", prompt="hi")
    assert q.to_record() == {"id": "q-0", "prompt": "hi", "max_tokens": 1024}
    full = LlmQuery(id="q-1", prompt="p", system="s", max_tokens=7, grounded=True,
                    underspecified=True)
    assert full.to_record() == {"id": "q-1", "prompt": "p", "max_tokens": 7, "system": "s",
                                "grounded": True, "underspecified": True}


@pytest.mark.parametrize(
    "query",
    [
        LlmQuery(id="q-0", prompt="hi"),
        LlmQuery(id="q-3", prompt="émoji 😀", system="sys", max_tokens=5, grounded=True),
        LlmQuery(id="f-1-2", prompt="", underspecified=True),
    ],
)
def test_llm_query_record_round_trips_through_msgpack(query: LlmQuery) -> None:
    assert LlmQuery.from_record(unpack(pack(query.to_record()))) == query


def test_llm_query_wire_has_flags_only_when_true() -> None:
    plain = LlmQuery(id="q-0", prompt="p")
    assert plain.to_wire() == {"id": "q-0", "prompt": "p", "system": None, "max_tokens": 1024}
    assert plain.to_wire(id_key="query_id") == {
        "query_id": "q-0", "prompt": "p", "system": None, "max_tokens": 1024,
    }
    g = LlmQuery(id="q-0", prompt="p", system="s", max_tokens=9, grounded=True)
    assert g.to_wire() == {"id": "q-0", "prompt": "p", "system": "s", "max_tokens": 9,
                           "grounded": True}
    u = LlmQuery(id="q-0", prompt="p", underspecified=True)
    assert "grounded" not in u.to_wire()
    assert u.to_wire()["underspecified"] is True


# -- PendingFilter ----------------------------------------------------------------------------


def _q(prompt: str = "short prompt") -> LlmQuery:
    return LlmQuery(id="q-1", prompt=prompt, system="sys", max_tokens=64, grounded=True)


def test_pending_filter_meta_is_id_and_max_tokens_only() -> None:
    assert PendingFilter.META.project(_q()) == {"query_id": "q-1", "max_tokens": 64}


def test_pending_filter_preview_adds_the_prompt_start() -> None:
    assert PendingFilter.PREVIEW.project(_q()) == {
        "query_id": "q-1", "max_tokens": 64, "prompt_preview": "short prompt",
    }


def test_pending_filter_preview_is_200_code_points_of_multibyte_text() -> None:
    prompt = "😀é" * 150  # 300 code points, 900 UTF-8 bytes
    preview = PendingFilter.PREVIEW.project(_q(prompt))["prompt_preview"]
    assert PREVIEW_CHARS == 200
    assert len(preview) == 200
    assert preview == "😀é" * 100
    assert prompt.startswith(preview)
    preview.encode("utf-8")  # no character split into an invalid surrogate


def test_pending_filter_preview_of_exactly_200_and_201_characters() -> None:
    assert PendingFilter.PREVIEW.project(_q("x" * 200))["prompt_preview"] == "x" * 200
    assert PendingFilter.PREVIEW.project(_q("x" * 201))["prompt_preview"] == "x" * 200


def test_pending_filter_full_has_every_field() -> None:
    assert PendingFilter.FULL.project(_q("whole prompt")) == {
        "query_id": "q-1", "max_tokens": 64, "system": "sys", "grounded": True,
        "underspecified": False, "prompt": "whole prompt",
    }


def test_pending_filter_from_its_string_names() -> None:
    assert [PendingFilter(x) for x in ("meta", "preview", "full")] == [
        PendingFilter.META, PendingFilter.PREVIEW, PendingFilter.FULL,
    ]
    with pytest.raises(ValueError):
        PendingFilter("everything")


# -- the algocline JSON shapes --------------------------------------------------------------


def test_accepted_shape() -> None:
    assert Accepted(2).to_json(SID) == {"status": "accepted", "remaining": 2}


def test_single_query_paused_shape() -> None:
    paused = Paused((LlmQuery(id="q-0", prompt="p", max_tokens=10),))
    assert paused.to_json(SID) == {
        "status": "needs_response", "session_id": SID, "query_id": "q-0", "prompt": "p",
        "system": None, "max_tokens": 10,
    }


def test_single_query_paused_shape_with_flags() -> None:
    paused = Paused((LlmQuery(id="q-0", prompt="p", system="s", grounded=True,
                              underspecified=True),))
    assert paused.to_json(SID) == {
        "status": "needs_response", "session_id": SID, "query_id": "q-0", "prompt": "p",
        "system": "s", "max_tokens": 1024, "grounded": True, "underspecified": True,
    }


def test_batch_paused_shape() -> None:
    paused = Paused((
        LlmQuery(id="q-0", prompt="a"),
        LlmQuery(id="q-1", prompt="b", system="s", max_tokens=3, underspecified=True),
    ))
    assert paused.to_json(SID) == {
        "status": "needs_response",
        "session_id": SID,
        "queries": [
            {"id": "q-0", "prompt": "a", "system": None, "max_tokens": 1024},
            {"id": "q-1", "prompt": "b", "system": "s", "max_tokens": 3,
             "underspecified": True},
        ],
    }


def test_finished_shapes() -> None:
    stats = {"llm_calls": 1}
    assert Finished(Phase.COMPLETED, {"a": 1}, None, stats).to_json(SID) == {
        "status": "completed", "result": {"a": 1}, "stats": stats,
    }
    assert Finished(Phase.CANCELLED, None, None, stats).to_json(SID) == {
        "status": "cancelled", "stats": stats,
    }
    assert Finished(Phase.FAILED, None, "boom", stats).to_json(SID) == {
        "status": "error", "error": "boom", "type": "strategy_error",
    }
    # a failure's own type when it has one (budget, expiry, ...): one vocabulary on every front
    assert Finished(Phase.FAILED, None, "late", stats, error_type="expired").to_json(SID) == {
        "status": "error", "error": "late", "type": "expired",
    }


def test_completed_with_a_null_result_keeps_the_result_key() -> None:
    assert Finished(Phase.COMPLETED).to_json(SID) == {
        "status": "completed", "result": None, "stats": {},
    }


def test_feed_result_aliases() -> None:
    assert FeedResult.Accepted is Accepted  # type: ignore[attr-defined]
    assert FeedResult.Paused is Paused  # type: ignore[attr-defined]
    assert FeedResult.Finished is Finished  # type: ignore[attr-defined]
    assert isinstance(Accepted(1), FeedResult)
    with pytest.raises(NotImplementedError):
        FeedResult().to_json(SID)


# -- session ids ------------------------------------------------------------------------------

SID_RE = re.compile(r"s-([0-9a-f]+)-([0-9a-f]{32})")


def test_session_id_format_and_clock_part() -> None:
    before = time.time_ns() // 1_000_000
    sid = new_session_id()
    after = time.time_ns() // 1_000_000
    m = SID_RE.fullmatch(sid)
    assert m is not None, sid
    assert before <= int(m.group(1), 16) <= after


def test_session_ids_are_unique_and_their_random_part_varies() -> None:
    ids = [new_session_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    randoms = [SID_RE.fullmatch(s).group(2) for s in ids]  # type: ignore[union-attr]
    assert len(set(randoms)) == 1000
    # 128 random bits: every hex digit shows up in every position across 1000 ids, which a
    # counter or a clock-derived suffix would not do.
    for pos in range(32):
        assert len({r[pos] for r in randoms}) == 16


# -- errors -----------------------------------------------------------------------------------


def test_error_tree() -> None:
    assert issubclass(errors.PayloadTooLarge, errors.InvalidInput)
    for cls in (errors.LockTimeout, errors.LockOrderError, errors.LockLost):
        assert issubclass(cls, errors.LockError)
    assert not hasattr(errors, "FencedOut")  # replaced by LockLost
    leaves = [
        errors.NotFound, errors.UnknownQuery, errors.AlreadyResponded, errors.NoPendingQuery,
        errors.InvalidTransition, errors.WaitTimeout, errors.InvalidInput,
        errors.PayloadTooLarge, errors.UnknownStrategy, errors.NonDeterminism,
        errors.BudgetExceeded, errors.StepTimeout, errors.CorruptState, errors.Unavailable,
        errors.Misconfigured, errors.LockError, errors.LockTimeout, errors.LockOrderError,
        errors.LockLost,
    ]
    for cls in leaves:
        assert issubclass(cls, errors.SessionError)
    codes = [cls.code for cls in leaves]
    assert len(set(codes)) == len(codes)
    assert all(re.fullmatch(r"[a-z_]+", c) for c in codes)


def test_unavailable_carries_the_masked_url_and_its_cause() -> None:
    e = errors.Unavailable("redis at redis://:***@h:1/0 is unavailable", url="redis://:***@h:1/0",
                           cause="Connection refused")
    assert (e.url, e.cause, e.code) == ("redis://:***@h:1/0", "Connection refused",
                                        "unavailable")
    assert e.to_json() == {"status": "error", "error": e.message, "type": "unavailable",
                           "redis": "redis://:***@h:1/0"}
    assert "redis" not in errors.Unavailable("down").to_json()
    assert errors.Misconfigured("no db").to_json()["type"] == "misconfigured"


def test_error_to_json_carries_only_the_fields_set() -> None:
    assert errors.NotFound("gone").to_json() == {
        "status": "error", "error": "gone", "type": "not_found",
    }
    e = errors.InvalidTransition("nope", session_id=SID, query_id="q-0", state="completed")
    assert (e.message, e.session_id, e.query_id, e.state) == ("nope", SID, "q-0", "completed")
    assert str(e) == "nope"
    assert e.to_json() == {
        "status": "error", "error": "nope", "type": "invalid_transition", "session_id": SID,
        "query_id": "q-0", "state": "completed",
    }


# -- phases -----------------------------------------------------------------------------------


def test_phase_terminal_and_coarse_state() -> None:
    assert {Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED} == TERMINAL
    assert [p.state for p in Phase] == ["running", "paused", "terminal", "terminal", "terminal"]
    assert not Phase.RUNNING.terminal and not Phase.PAUSED.terminal


def test_phase_transitions() -> None:
    assert can_transition(Phase.RUNNING, Phase.PAUSED)
    assert can_transition(Phase.PAUSED, Phase.RUNNING)
    assert can_transition(Phase.PAUSED, Phase.CANCELLED)
    assert not can_transition(Phase.PAUSED, Phase.COMPLETED)  # only a step completes
    for phase in TERMINAL:
        assert TRANSITIONS[phase] == frozenset()
        assert not any(can_transition(phase, other) for other in Phase)


# -- keys -------------------------------------------------------------------------------------


def test_session_keys_share_one_hash_tag() -> None:
    sk = Keys("ns").session(SID)
    tag = "{" + SID + "}"
    assert sk.all_data() == [f"ns:{tag}", f"ns:{tag}:pending", f"ns:{tag}:answers",
                             f"ns:{tag}:journal", f"ns:{tag}:logs"]
    assert sk.lock == f"ns:{tag}:lock"
    assert sk.channel == f"ns:{tag}:events"
    assert Keys.lock_released(sk.lock) == f"ns:{tag}:lock:released"


@pytest.mark.parametrize("bad", ["", "a:b", "a{b", "a}b", "a b", "a\tb"])
def test_bad_namespaces_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        Keys(bad)


# -- pause events -----------------------------------------------------------------------------


def test_pause_event_round_trip_and_round_filter() -> None:
    queries = [LlmQuery(id="q-0", prompt="a"), LlmQuery(id="q-1", prompt="b", grounded=True)]
    msg = pause_event(3, [q.to_record() for q in queries])
    assert parse_pause(msg, 2) == Paused(tuple(queries))
    assert parse_pause(msg, 3) is None  # not newer than the round the waiter is past
    assert parse_pause(msg, 4) is None


@pytest.mark.parametrize(
    "message",
    [b"complete", b"fail", b"cancelled", b"1", msgpack.packb(["x", 5, []]),
     msgpack.packb(["p", 5, [{"no": "id"}]]), b"\x93\xc1\xc1\xc1"],
)
def test_non_pause_messages_are_plain_wakeups(message: bytes) -> None:
    assert parse_pause(message, 0) is None


# -- codec ------------------------------------------------------------------------------------


def test_check_text_accepts_str_and_utf8_bytes() -> None:
    assert check_text("héllo", what="r", limit=100) == "héllo"
    assert check_text("héllo".encode(), what="r", limit=100) == "héllo"
    assert check_text(bytearray(b"ok"), what="r", limit=100) == "ok"


def test_check_text_limit_counts_utf8_bytes() -> None:
    assert check_text("é" * 4, what="r", limit=8) == "é" * 4
    with pytest.raises(errors.PayloadTooLarge, match="10 bytes"):
        check_text("é" * 5, what="r", limit=8)


@pytest.mark.parametrize("value", [None, 1, 1.5, ["a"], {"a": "b"}, b"\xff\xfe", "\ud800"])
def test_check_text_rejects_non_text(value: object) -> None:
    with pytest.raises(errors.InvalidInput):
        check_text(value, what="r", limit=100)


@pytest.mark.parametrize("value", [object(), float("nan"), float("inf"), {1, 2}, b"bytes"])
def test_check_json_able_rejects(value: object) -> None:
    with pytest.raises(errors.InvalidInput, match="JSON-able"):
        check_json_able({"x": value}, what="input")


def _circular_list() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _circular_dict() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.timeout(2)
@pytest.mark.parametrize("make", [_circular_list, _circular_dict])
def test_check_json_able_rejects_circular_values(make: Any) -> None:
    """A self-referencing value is not JSON: it must be refused, not walked forever."""
    with pytest.raises(errors.InvalidInput):
        check_json_able({"x": make()}, what="input")


def test_check_json_able_rejects_nesting_too_deep_to_encode() -> None:
    check_json_able({"x": nested(100)}, what="input")
    with pytest.raises(errors.InvalidInput):
        check_json_able({"x": nested(5000)}, what="input")


@pytest.mark.parametrize("value", [{1: "a"}, {"ok": {2.5: "b"}}, {"ok": [{None: 1}]},
                                   {"n": 2**64}, {"n": [-(2**63) - 1]}])
def test_check_json_able_rejects_what_would_not_round_trip(value: Any) -> None:
    with pytest.raises(errors.InvalidInput):
        check_json_able(value, what="input")


def test_check_json_able_accepts_64_bit_extremes() -> None:
    check_json_able({"n": [2**64 - 1, -(2**63), True, 1.5]}, what="input")


def test_check_json_able_size_limit() -> None:
    assert check_json_able({"a": "é"}, what="input") == len('{"a": "é"}'.encode())
    with pytest.raises(errors.PayloadTooLarge):
        check_json_able({"a": "x" * 100}, what="input", limit=50)


def test_unpack_garbage_is_corrupt_state() -> None:
    with pytest.raises(errors.CorruptState):
        unpack(b"\xc1", what="thing", session_id=SID)


def test_estimate_tokens_is_algoclines() -> None:
    """Four ASCII characters a token and 1.5 of other text, each part rounded up (the
    cases of algocline's own tokens.rs tests)."""
    assert [estimate_tokens("x" * n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert estimate_tokens("hello world") == 3
    assert estimate_tokens("あいう") == 2
    assert estimate_tokens("hello あ") == 3


# -- settings ---------------------------------------------------------------------------------


def test_settings_from_environment_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALC_LEASE_MS", "1234")
    monkeypatch.setenv("ALC_WAIT_SLICE_S", "0.25")
    monkeypatch.setenv("ALC_NAMESPACE", "envns")
    monkeypatch.delenv("REDIS_URL", raising=False)
    s = Settings.from_url(None, lease_ms=99, namespace=None)
    assert (s.lease_ms, s.wait_slice_s, s.namespace, s.url) == (99, 0.25, "envns", None)
    monkeypatch.setenv("ALC_LEASE_MS", "soon")
    with pytest.raises(ValueError, match="ALC_LEASE_MS"):
        Settings.from_url("redis://x")
