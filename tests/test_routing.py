"""Topic and headers matching: table cases plus properties checked with hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor.broker.routing import RoutingTable, headers_match, topic_matches
from conveyor.model import Binding, ExchangeInfo


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("a.b.c", "a.b.c", True),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.c", False),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("#", "", True),
        ("#", "a.b", True),
        ("*", "", False),
        ("*", "a", True),
        ("#.a", "a", True),
        ("#.a", "b.a.a", True),
        ("a.#", "a", True),
        ("*.*", "a", False),
        ("#.#", "a.b", True),
        ("a.*.#", "a", False),
        ("a.*.#", "a.b", True),
    ],
)
def test_topic_table(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


word = st.sampled_from(["a", "b", "c", "order", "eu"])
pattern_word = st.sampled_from(["a", "b", "c", "order", "eu", "*", "#"])


def _oracle(pattern: str, key: str) -> bool:
    pw = pattern.split(".") if pattern else []
    kw = key.split(".") if key else []

    def go(i: int, j: int) -> bool:
        if i == len(pw):
            return j == len(kw)
        if pw[i] == "#":
            return any(go(i + 1, k) for k in range(j, len(kw) + 1))
        if j < len(kw) and (pw[i] == "*" or pw[i] == kw[j]):
            return go(i + 1, j + 1)
        return False

    return go(0, 0)


@given(st.lists(pattern_word, max_size=6), st.lists(word, max_size=6))
def test_topic_matches_oracle(pattern: list[str], key: list[str]) -> None:
    p, k = ".".join(pattern), ".".join(key)
    assert topic_matches(p, k) == _oracle(p, k)


@given(st.lists(word, max_size=6))
def test_literal_pattern_matches_itself_and_hash_matches_all(key: list[str]) -> None:
    k = ".".join(key)
    assert topic_matches(k, k)
    assert topic_matches("#", k)


def test_headers_match_modes() -> None:
    assert headers_match({"a": 1}, {"a": 1, "b": 2})
    assert not headers_match({"a": 1, "c": 3}, {"a": 1})
    assert headers_match({"x-match": "any", "a": 1, "c": 3}, {"a": 1})
    assert headers_match({"a": None}, {"a": "anything"})
    assert not headers_match({"x-match": "any"}, {"a": 1})  # nothing to match
    assert headers_match({}, {})
    assert headers_match({"x-match": "all-with-x", "x-k": 1}, {"x-k": 1})
    assert not headers_match({"x-match": "all-with-x", "x-k": 1}, {})


@given(st.lists(st.sampled_from(["q1", "q2", "q3"]), max_size=8))
def test_route_each_queue_once_and_cycles_end(queues: list[str]) -> None:
    xs = {n: ExchangeInfo(name=n, type="fanout") for n in ("x", "y")}
    bindings = [Binding(source="x", destination=q) for q in queues]
    bindings += [
        Binding(source="x", destination="y", destination_kind="exchange"),
        Binding(source="y", destination="x", destination_kind="exchange"),
        Binding(source="y", destination="q1"),
    ]
    routed = RoutingTable(xs, bindings).route("x", "k", {})
    assert len(routed) == len(set(routed))
    assert set(routed) == set(queues) | {"q1"}
