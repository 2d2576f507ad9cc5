"""Whatever is posted, the shim answers 200 or an OpenAI-shaped client error, never a 500."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from shim_helpers import MODEL_ID, in_thread, start_shim

from dbloom.inference import MLXEngine

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
FIELDS = (
    "model",
    "messages",
    "prompt",
    "input",
    "instructions",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "top_k",
    "min_p",
    "repetition_penalty",
    "n",
    "stream",
    "stream_options",
    "tools",
    "response_format",
    "text",
    "user",
    "metadata",
    "echo",
    "best_of",
    "suffix",
    "previous_response_id",
)

# Text, often holding lone surrogates (JSON escapes them as `\\ud800`): a tokenizer
# refuses them, and they are too rare among all code points to turn up by chance.
surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)
any_text = st.text(max_size=12) | surrogates
# Small numbers keep any valid request short: max_tokens stays under 100.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 99)
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
    | st.sampled_from([MODEL_ID, "user", "assistant", "system", "text", "input_text"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["role", "content", "type", "text", "include_usage"])
            | st.text(max_size=6),
            inner,
            max_size=3,
        )
    ),
    max_leaves=8,
)
text = st.text(min_size=1, max_size=12) | st.text(min_size=1, max_size=12) | surrogates
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"])},
        optional={"content": text | values, "type": st.just("message")},
    ),
    max_size=3,
)
valid_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": text}),
    min_size=1,
    max_size=2,
)
# A valid core for every route (each ignores the others' input field) plus a couple of
# arbitrary fields, so that parsing, the engine and the answer paths are all reached.
mostly_valid = st.builds(
    lambda core, extra: core | extra,
    st.fixed_dictionaries(
        {
            "model": st.sampled_from([MODEL_ID, MODEL_ID, "other"]),
            "messages": valid_messages,
            "prompt": text,
            "input": text | valid_messages,
            "max_tokens": st.integers(1, 4),
            "max_completion_tokens": st.integers(1, 4),
            "max_output_tokens": st.integers(1, 4),
        }
    ),
    st.dictionaries(st.sampled_from(FIELDS), values, max_size=2),
)
bodies = st.one_of(
    values,
    mostly_valid,
    st.fixed_dictionaries(
        {"model": st.just(MODEL_ID) | values},
        optional={name: values for name in FIELDS if name != "model"}
        | {"messages": messages, "input": messages | text},
    ),
)


def acceptable(response: httpx2.Response) -> None:
    assert response.status_code in (200, 400, 404), response.text
    if response.status_code == 200:
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}


async def test_arbitrary_bodies_never_fail_the_server(engine: MLXEngine) -> None:
    async with trio.open_nursery() as nursery:
        shim = await start_shim(nursery, engine, default_max_tokens=4)

        def fuzz() -> None:
            with httpx2.Client(base_url=shim.url, timeout=30) as http:

                @settings(max_examples=250, database=None)
                @given(route=st.sampled_from(ROUTES), body=bodies)
                def post_json(route: str, body: Any) -> None:
                    acceptable(http.post(route, content=json.dumps(body).encode()))

                @settings(max_examples=80, database=None)
                @given(route=st.sampled_from(ROUTES), body=st.binary(max_size=64))
                def post_bytes(route: str, body: bytes) -> None:
                    acceptable(http.post(route, content=body))

                post_json()
                post_bytes()

        await in_thread(fuzz)
        nursery.cancel_scope.cancel()
