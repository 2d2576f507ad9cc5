"""The MLX engine on a real (generated) model: batching, sampling, stops, admission, shutdown."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from infer_helpers import MODEL_ID, collect, text_of, tokens_of

from dbloom.inference import (
    ChatMessage,
    EngineBusy,
    EngineClosed,
    FinishReason,
    GenerateRequest,
    InsufficientMemory,
    InvalidRequest,
    MLXEngine,
    SlowConsumer,
    UnknownModel,
)
from dbloom.inference._mlx_engine import plain_chat_prompt

PROMPTS = [
    "Hello world",
    "The quick brown fox",
    "A",
    "Numbers like 0 1 2 3 and then some more words",
    "She sells sea shells",
    "Peers find each other",
    "To be or not to be",
    "Small models are fast to build",
]


def greedy(prompt: str, max_tokens: int = 24, **kwargs: Any) -> GenerateRequest:
    return GenerateRequest(
        model=MODEL_ID, prompt=prompt, max_tokens=max_tokens, temperature=0.0, **kwargs
    )


async def test_single_request_matches_mlx_lm(engine: MLXEngine, reference: Any) -> None:
    from mlx_lm import stream_generate

    model, tokenizer = reference
    chunks, final = await collect(engine.generate(greedy(PROMPTS[0], 40)))
    expected = list(stream_generate(model, tokenizer, PROMPTS[0], max_tokens=40))
    ids = [r.token for r in expected]
    if expected[-1].finish_reason == "stop":
        ids.pop()
    assert tokens_of(chunks) == ids
    assert text_of(chunks) == "".join(r.text for r in expected)
    assert final.finish_reason.value == expected[-1].finish_reason
    assert final.prompt_tokens == len(tokenizer.encode(PROMPTS[0]))
    assert final.completion_tokens == len(ids)
    assert len(final.request_id) == 32


async def test_concurrent_greedy_equals_sequential(engine: MLXEngine) -> None:
    sequential = [tokens_of((await collect(engine.generate(greedy(p))))[0]) for p in PROMPTS]
    concurrent: dict[int, list[int]] = {}
    peak = 0

    async def one(i: int) -> None:
        nonlocal peak
        chunks, _ = await collect(engine.generate(greedy(PROMPTS[i])))
        peak = max(peak, engine.load().active)
        concurrent[i] = tokens_of(chunks)

    async with trio.open_nursery() as nursery:
        for i in range(len(PROMPTS)):
            nursery.start_soon(one, i)
    assert [concurrent[i] for i in range(len(PROMPTS))] == sequential
    assert peak > 1
    assert engine.load().active == engine.load().queued == 0


async def test_seeded_sampling_is_reproducible(engine: MLXEngine) -> None:
    def sampled(seed: int) -> GenerateRequest:
        return GenerateRequest(
            model=MODEL_ID,
            prompt="Hello",
            max_tokens=20,
            temperature=1.0,
            top_p=0.95,
            top_k=50,
            min_p=0.01,
            seed=seed,
        )

    first = tokens_of((await collect(engine.generate(sampled(1))))[0])
    again: list[list[int]] = []

    async def run(request: GenerateRequest) -> None:
        again.append(tokens_of((await collect(engine.generate(request)))[0]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, sampled(1))
        for p in PROMPTS[:3]:
            nursery.start_soon(run, greedy(p))
    other = tokens_of((await collect(engine.generate(sampled(2))))[0])
    assert first in again
    assert first != other


async def test_stop_strings_cut_text_and_never_leak(engine: MLXEngine) -> None:
    chunks, final = await collect(engine.generate(greedy(PROMPTS[1], 30)))
    text = text_of(chunks)
    assert final.finish_reason is FinishReason.LENGTH and len(text) > 12
    stop = text[6:9]
    cut = text.find(stop)
    chunks, final = await collect(engine.generate(greedy(PROMPTS[1], 30, stop=("zzqq#", stop))))
    assert text_of(chunks) == text[:cut]
    assert final.finish_reason is FinishReason.STOP
    assert final.completion_tokens == len(tokens_of(chunks)) < 30
    unmatched = text[4:6] + "\x00never"
    chunks, final = await collect(engine.generate(greedy(PROMPTS[1], 30, stop=(unmatched,))))
    assert text_of(chunks) == text and final.finish_reason is FinishReason.LENGTH


async def test_logprobs_and_logit_bias(engine: MLXEngine) -> None:
    request = greedy(PROMPTS[2], 8, logprobs=True, top_logprobs=3)
    chunks, _ = await collect(engine.generate(request))
    for chunk in chunks:
        assert chunk.logprobs is not None and len(chunk.logprobs) == len(chunk.token_ids)
        for token, lp in zip(chunk.token_ids, chunk.logprobs, strict=True):
            assert lp.token == token and lp.logprob <= 0
            assert len(lp.top) == 3 and lp.top[0] == (token, pytest.approx(lp.logprob))
            assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
            assert isinstance(lp.text, str) and len(lp.top_text) == 3
            assert lp.top_text[0] == lp.text
    chunks, _ = await collect(engine.generate(greedy(PROMPTS[2], 6, logit_bias={42: 100})))
    assert tokens_of(chunks) == [42] * 6
    penalised = greedy(
        PROMPTS[2], 6, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=1.0
    )
    chunks, final = await collect(engine.generate(penalised))
    assert final.completion_tokens == 6


async def test_chat_template_and_plain_fallback(
    engine: MLXEngine, tiny_model: Path, tmp_path: Path, reference: Any
) -> None:
    messages = (ChatMessage(role="user", content="hi there"),)
    _, tokenizer = reference
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi there"}], add_generation_prompt=True
    )
    request = GenerateRequest(model=MODEL_ID, messages=messages, max_tokens=4, temperature=0)
    _, final = await collect(engine.generate(request))
    assert final.prompt_tokens == len(templated)

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    plain = plain_chat_prompt([{"role": "user", "content": "hi there"}])
    assert plain == "user: hi there\nassistant:"
    async with MLXEngine(bare, model_id=MODEL_ID) as bare_engine:
        _, final = await collect(bare_engine.generate(request))
    assert final.prompt_tokens == len(tokenizer.encode(plain))


async def test_bad_requests_get_clean_errors(engine: MLXEngine) -> None:
    with pytest.raises(UnknownModel, match="serves 'tiny'"):
        await collect(engine.generate(GenerateRequest(model="other", prompt="x")))
    too_long = greedy("hello " * 3000, 4)
    with pytest.raises(InvalidRequest, match="context"):
        await collect(engine.generate(too_long))
    with pytest.raises(InvalidRequest, match="context"):
        await collect(engine.generate(greedy("hi", 5000)))
    with pytest.raises(InvalidRequest, match="vocabulary"):
        await collect(engine.generate(greedy("hi", 4, logit_bias={10**6: 1})))
    assert engine.load().active == engine.load().queued == 0
    _, final = await collect(engine.generate(greedy("still fine", 3)))
    assert final.completion_tokens == 3


async def test_cancel_mid_stream_frees_the_slot(tiny_model: Path) -> None:
    async with MLXEngine(tiny_model, model_id=MODEL_ID, max_batch=1, max_queue=0) as engine:
        long = greedy(PROMPTS[0], 2000)
        async with engine.generate(long) as generation:
            async for _ in generation:
                if engine.load().active == 1:
                    break
        assert engine.load().active == 0
        with trio.fail_after(3):
            _, final = await collect(engine.generate(greedy(PROMPTS[1], 8)))
        assert final.finish_reason is FinishReason.LENGTH

        generation = engine.generate(long)
        await generation.start()
        await generation.__anext__()
        generation.cancel()
        final = await generation.__anext__()
        assert final.finish_reason is FinishReason.CANCELLED
        assert final.completion_tokens >= 1
        with pytest.raises(StopAsyncIteration):
            await generation.__anext__()

        got_one = trio.Event()

        async def reader() -> None:
            async with engine.generate(long) as g:
                async for _ in g:
                    got_one.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await got_one.wait()
            nursery.cancel_scope.cancel()
        with trio.fail_after(3):
            await collect(engine.generate(greedy(PROMPTS[2], 8)))


async def test_flood_past_the_queue_is_busy_not_a_hang(tiny_model: Path) -> None:
    async with MLXEngine(tiny_model, model_id=MODEL_ID, max_batch=2, max_queue=2) as engine:
        held = [engine.generate(greedy(p, 2000)) for p in PROMPTS[:4]]
        for generation in held:
            await generation.start()
        assert engine.load().free == 0
        with trio.fail_after(1), pytest.raises(EngineBusy):
            await engine.generate(greedy("one more")).start()
        for generation in held:
            await generation.aclose()
        assert engine.load().active == engine.load().queued == 0
        with trio.fail_after(3):
            await collect(engine.generate(greedy("now there is room", 4)))


async def test_a_prompt_far_beyond_the_context_is_refused_before_it_is_tokenized(
    engine: MLXEngine,
) -> None:
    # A hostile 4 MiB prompt used to hold the tokenizer (and every request behind it) for
    # seconds; now it is counted in pieces and refused once it surely cannot fit.
    huge = greedy("ab " * 1_398_000, 4)
    with trio.fail_after(30), pytest.raises(InvalidRequest, match=r"over \d+ tokens"):
        await collect(engine.generate(huge))
    # A prompt that fits, however many characters it spends per token, is still served:
    # " decentralized" is one token of the generated vocabulary, 14 characters long.
    words = 9 * (engine.info.context_length - 2) // 10
    long_words = greedy(" decentralized" * words, 2)
    _, final = await collect(engine.generate(long_words))
    assert words <= final.prompt_tokens <= words + 1


async def test_a_flooding_client_cannot_lock_others_out(tiny_model: Path) -> None:
    async with MLXEngine(tiny_model, model_id=MODEL_ID, max_batch=1, max_queue=3) as engine:
        flood = [engine.generate(greedy(p, 2000), client="flood") for p in PROMPTS[:4]]
        for generation in flood:
            await generation.start()  # one running, three queued: every place taken
        with pytest.raises(EngineBusy, match="running"):
            await engine.generate(greedy("more", 1), client="flood").start()

        # A newcomer takes the flood's newest queued place; that request hears "busy".
        first = engine.generate(greedy(PROMPTS[4], 2), client="fair")
        await first.start()
        with trio.fail_after(1), pytest.raises(EngineBusy, match=r"displaced: .* held 4 of"):
            await flood[3].__anext__()
        second = engine.generate(greedy(PROMPTS[5], 2), client="fair")
        await second.start()  # 3 against 1 still: one more place changes hands
        with trio.fail_after(1), pytest.raises(EngineBusy, match="displaced"):
            await flood[2].__anext__()
        # Two each now: nobody else gives way, for the flood or for the newcomer.
        for client in ("fair", "flood"):
            with pytest.raises(EngineBusy, match="running"):
                await engine.generate(greedy("and more", 1), client=client).start()

        # A freed slot goes to the client whose turn is longest ago, not to the oldest
        # queued request (the flood's): the newcomer is served next.
        await flood[0].aclose()
        with trio.fail_after(10):
            _, final = await collect(first)
        assert final.finish_reason is FinishReason.LENGTH
        assert [slot.client for slot in engine._running.values()] == ["flood"]
        for generation in (second, flood[1]):
            await generation.aclose()


async def test_a_refused_request_costs_nobody_their_place(tiny_model: Path) -> None:
    async with MLXEngine(tiny_model, model_id=MODEL_ID, max_batch=1, max_queue=2) as engine:
        held = [engine.generate(greedy(p, 2000), client="busy") for p in PROMPTS[:3]]
        for generation in held:
            await generation.start()
        too_long = greedy("x " * engine.info.context_length, 4)
        for _ in range(3):
            with pytest.raises(InvalidRequest):
                await engine.generate(too_long, client="hostile").start()
        assert engine.load().queued == 2  # the heavy client kept every queued place
        for generation in held:
            await generation.aclose()


async def test_places_held_while_tokenizing_can_change_hands(tiny_model: Path) -> None:
    # A flood of requests still with the tokenizer (slow ones, or ones that will be
    # refused once counted) used to hold every place out of a newcomer's reach.
    async with MLXEngine(tiny_model, model_id=MODEL_ID, max_batch=1, max_queue=2) as engine:
        running = engine.generate(greedy(PROMPTS[0], 2000), client="flood")
        await running.start()
        outcomes: dict[str, str] = {}
        release = trio.Event()

        async def hold_the_tokenizer(task_status: trio.TaskStatus[None]) -> None:
            async with engine._tokenizer_turns.turn("test"):
                task_status.started()
                await release.wait()

        async def admit(name: str, client: str) -> None:
            generation = engine.generate(greedy(name, 2000), client=client)
            try:
                await generation.start()
                outcomes[name] = "queued"
                await generation.__anext__()
            except EngineBusy as exc:
                outcomes[name] = str(exc)

        async with trio.open_nursery() as nursery:
            await nursery.start(hold_the_tokenizer)  # the flood's next two wait for it
            for name in ("flood 1", "flood 2"):
                nursery.start_soon(admit, name, "flood")
            await trio.testing.wait_all_tasks_blocked()
            assert engine._admitting.total() == 2  # every place is taken
            nursery.start_soon(admit, "fair", "fair")
            await trio.testing.wait_all_tasks_blocked()
            assert "fair" not in outcomes  # not refused: waiting for the tokenizer
            release.set()
            with trio.fail_after(10):
                while len(outcomes) < 3:
                    await trio.sleep(0.01)
            # The newcomer's turn at the tokenizer came first, so it took the free place;
            # of the flood's two, one got the last place and the other heard "busy".
            assert outcomes.pop("fair") == "queued"
            assert sorted(o == "queued" for o in outcomes.values()) == [False, True]
            nursery.cancel_scope.cancel()
        await running.aclose()


async def test_admitting_and_cancelling_cannot_displace_others_for_free(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dbloom.inference._mlx_engine.DISPLACED_MEMORY", 0.5)
    async with MLXEngine(tiny_model, model_id=MODEL_ID, max_batch=1, max_queue=3) as engine:
        shim = [engine.generate(greedy(p, 2000), client="shim") for p in PROMPTS[:4]]
        for generation in shim:
            await generation.start()

        async def churn() -> int:
            """Take a place and give it up at once, refilling the shim's, until refused."""
            displaced = 0
            while displaced < 20:
                grab = engine.generate(greedy("grab", 2000), client="churner")
                try:
                    await grab.start()
                except EngineBusy:
                    return displaced
                displaced += 1
                await grab.aclose()
                assert engine.load().queued == 2
                refill = engine.generate(greedy("refill", 2000), client="shim")
                await refill.start()
                shim.append(refill)
            return displaced

        # Each place taken and given up still counts for a while, so a churner holding
        # nothing displaces at most 3 of the shim's 4 per memory span, not without end.
        assert await churn() == 3
        await trio.sleep(0.6)  # forgotten: a newcomer's fair share is back
        assert await churn() == 3
        for generation in shim:
            await generation.aclose()


async def test_a_request_cancelled_while_tokenized_displaces_nobody(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with MLXEngine(tiny_model, model_id=MODEL_ID, max_batch=1, max_queue=2) as engine:
        held = [engine.generate(greedy(p, 2000), client="busy") for p in PROMPTS[:3]]
        for generation in held:
            await generation.start()
        in_thread = threading.Event()
        go_on = threading.Event()
        prepare = engine._prepare

        def slow_prepare(request: GenerateRequest) -> Any:
            in_thread.set()
            go_on.wait(10)
            return prepare(request)

        monkeypatch.setattr(engine, "_prepare", slow_prepare)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.generate(greedy("leaving", 4), client="gone").start)
                await trio.to_thread.run_sync(in_thread.wait, 10)
                scope.cancel()  # the tokenizing thread cannot be interrupted...
                go_on.set()
        assert scope.cancelled_caught
        # ...but the cancelled request took nobody's place.
        assert [slot.client for slot in engine._queue] == ["busy", "busy"]
        for generation in held:
            await generation.aclose()


async def test_requests_being_tokenized_count_toward_busy(tiny_model: Path) -> None:
    async with MLXEngine(tiny_model, model_id=MODEL_ID, max_batch=1, max_queue=1) as engine:
        held = engine.generate(greedy(PROMPTS[0], 2000))
        await held.start()
        outcomes: list[tuple[str, int]] = []

        async def admit(prompt: str) -> None:
            try:
                async with engine.generate(greedy(prompt, 1)) as generation:
                    await generation.start()
                    outcomes.append(("admitted", 0))
            except EngineBusy:
                # Refused at once, while the first is still with the tokenizer; before,
                # each waited its turn at the tokenizer to be told.
                outcomes.append(("busy", engine._admitting.total()))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for prompt in PROMPTS[1:4]:
                    nursery.start_soon(admit, prompt)
        assert sorted(outcomes) == [("admitted", 0), ("busy", 1), ("busy", 1)]
        await held.aclose()


async def test_slow_consumer_is_dropped_without_slowing_the_batch(tiny_model: Path) -> None:
    async with MLXEngine(tiny_model, model_id=MODEL_ID, chunk_buffer=4) as engine:
        slow = engine.generate(greedy(PROMPTS[0], 500))
        await slow.start()
        with trio.fail_after(5):
            _, final = await collect(engine.generate(greedy(PROMPTS[1], 40)))
            while engine.load().active:
                await trio.sleep(0.01)
        assert final.completion_tokens == 40
        with pytest.raises(SlowConsumer):
            await slow.__anext__()


async def test_shutdown_ends_generations_promptly(tiny_model: Path) -> None:
    engine = MLXEngine(tiny_model, model_id=MODEL_ID)
    async with engine:
        running = engine.generate(greedy(PROMPTS[0], 2000))
        await running.start()
        await running.__anext__()
        queued = engine.generate(greedy(PROMPTS[1], 10))
        start = trio.current_time()
    assert trio.current_time() - start < 1
    with pytest.raises(EngineClosed):
        await running.__anext__()
    with pytest.raises(EngineClosed):
        await queued.start()
    with pytest.raises(RuntimeError):
        await engine.__aenter__()


async def test_requests_waiting_to_be_tokenized_at_shutdown_are_refused_untokenized(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = MLXEngine(tiny_model, model_id=MODEL_ID)
    tokenized: list[str | None] = []
    outcomes: list[str] = []
    release = trio.Event()

    async def hold_the_tokenizer(task_status: trio.TaskStatus[None]) -> None:
        async with engine._tokenizer_turns.turn("holder"):
            task_status.started()
            await release.wait()

    async def admit(i: int) -> None:
        try:
            await engine.generate(greedy(f"late {i}", 4), client=f"client {i}").start()
        except EngineClosed:
            outcomes.append("closed")

    async with trio.open_nursery() as nursery:
        async with engine:
            prepare = engine._prepare

            def counted(request: GenerateRequest) -> Any:
                tokenized.append(request.prompt)
                return prepare(request)

            monkeypatch.setattr(engine, "_prepare", counted)
            await nursery.start(hold_the_tokenizer)
            for i in range(3):
                nursery.start_soon(admit, i)
            await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert outcomes == ["closed"] * 3
    assert tokenized == []


async def test_engine_refuses_to_load_without_memory(tiny_model: Path) -> None:
    engine = MLXEngine(tiny_model, available_memory=1 << 20)
    with pytest.raises(InsufficientMemory):
        async with engine:
            pass
    with pytest.raises(EngineClosed):
        await engine.models()
    with pytest.raises(ValueError, match="positive"):
        MLXEngine(tiny_model, max_batch=0)
