"""GenerateRequest validation and the stop-string buffer (pure, no model)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbloom.inference import ChatMessage, GenerateRequest, InvalidRequest
from dbloom.inference._stops import StopBuffer


def make(**kwargs: Any) -> GenerateRequest:
    kwargs.setdefault("model", "m")
    if "messages" not in kwargs:
        kwargs.setdefault("prompt", "hi")
    return GenerateRequest(**kwargs)


def test_defaults_and_normalisation() -> None:
    r = make(logit_bias={5: 1, 2: -3.5}, stop=["a", "b"], temperature=1)
    assert r.logit_bias == ((2, -3.5), (5, 1.0))
    assert r.stop == ("a", "b")
    assert r.temperature == 1.0 and isinstance(r.temperature, float)
    assert not r.greedy and make(temperature=0).greedy
    m = make(messages=[ChatMessage(role="user", content="x")])
    assert isinstance(m.messages, tuple)
    hash(r)


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": 10**400}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"seed": -5}, "seed"),
        ({"seed": 1 << 64}, "seed"),
        ({"stop": "x"}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"stop": [5]}, "stop"),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {"a": 1}}, "logit_bias"),
        ({"logit_bias": {1: 1000}}, "logit_bias"),
        ({"logit_bias": 3}, "logit_bias"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
        ({"request_id": ""}, "request_id"),
        ({"model": ""}, "model"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 7}, "prompt"),
        ({"prompt": "a", "messages": [ChatMessage(role="user", content="b")]}, "exactly one"),
        ({"prompt": None}, "exactly one"),
        ({"prompt": None, "messages": []}, "messages"),
        ({"prompt": None, "messages": [("user", "x")]}, "messages"),
    ],
)
def test_invalid_requests_name_the_field(kwargs: dict[str, Any], word: str) -> None:
    with pytest.raises(InvalidRequest, match=word):
        make(**kwargs)


def test_chat_message_roles() -> None:
    with pytest.raises(InvalidRequest, match="role"):
        ChatMessage(role="robot", content="x")
    with pytest.raises(InvalidRequest, match="content"):
        ChatMessage(role="user", content=None)  # type: ignore[arg-type]


def run_stops(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    buf = StopBuffer(stops)
    out = []
    for piece in pieces:
        text, hit = buf.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    out.append(buf.flush())
    return "".join(out), False


def test_stop_spanning_pieces_is_never_emitted() -> None:
    buf = StopBuffer(["STOP"])
    assert buf.feed("abcST") == ("abc", False)
    assert buf.feed("O") == ("", False)
    assert buf.feed("Pxyz") == ("", True)
    buf = StopBuffer(["STOP"])
    assert buf.feed("abST") == ("ab", False)
    assert buf.feed("Ax") == ("STAx", False)
    assert buf.flush() == ""


@given(
    text=st.text(alphabet="abcS", max_size=40),
    stops=st.lists(st.text(alphabet="abcS", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_buffer_matches_search_at_each_boundary(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    expected: tuple[str, bool] = (text, False)
    for end in bounds[1:]:
        found = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
        if found:
            expected = (text[: min(found)], True)
            break
    assert run_stops(stops, pieces) == expected
