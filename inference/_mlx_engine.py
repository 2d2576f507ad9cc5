"""The MLX engine: mlx-lm's `BatchGenerator` in one worker thread, fed from trio.

Shape:

- trio tasks call `generate()`. Admission tokenizes (in a short `to_thread` call, one at a
  time, clients taking turns: `Turns`), checks the request against the model, and appends
  a slot to a bounded queue; past `max_batch + max_queue` it raises `EngineBusy` at once.
- The places are shared fairly between clients (a node names each by its peer id). When
  they are all taken, a newcomer takes the last queued place of the client holding the
  most, if that client holds at least two more than the newcomer (so it still holds at
  least as many after; its request hears "busy" and its shim tries another node). A
  client that gives up a place it took that way within `DISPLACED_MEMORY` seconds is
  counted as still holding it, so admit-and-cancel cannot knock others out for free. A
  freed batch slot goes to the queued request whose client has the fewest running, then
  whose client's turn is longest ago. One client alone may still use every place; a
  flooding client cannot lock others out of the queue (with `max_queue` 0 nothing is
  queued, so nothing can change hands).
- One long-lived worker thread (`trio.to_thread.run_sync`, owned by the engine's nursery)
  runs the decode loop. While it has work it never waits for trio: the trio side hands it
  requests and cancellations through two deques, and it posts each step's chunks back
  with `TrioToken.run_sync_soon`. With an empty batch it sleeps in `trio.from_thread.run`
  until a request is handed over (then waits up to `ADMISSION_WINDOW` for requests still
  being tokenized, so a burst shares one prefill).
- Each slot has a bounded channel. Delivery never waits: a consumer a whole buffer behind
  gets `SlowConsumer` and its request leaves the batch, so one slow reader never slows
  the others. A consumer that leaves (closed, cancelled) is removed before the next step.

Shutdown cancels the worker's scope; the thread checks it before every step, so it ends
within one decode step.
"""

from __future__ import annotations

import itertools
import secrets
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import trio

from ._engine import Engine, EngineLoad, Generation, ModelInfo
from ._errors import (
    EngineBusy,
    EngineClosed,
    EngineError,
    EngineFailure,
    InvalidRequest,
    SlowConsumer,
    UnknownModel,
)
from ._events import Chunk, Final, FinishReason, TokenLogprob, ToolCallDelta
from ._models import inspect_model, load_model
from ._request import GenerateRequest
from ._stops import StopBuffer
from ._tools import ToolCallReader, ToolSyntax
from ._turns import ServedOrder, Turns

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 32
DEFAULT_CHUNK_BUFFER = 256
DEFAULT_PREFILL_STEP = 512
ADMISSION_WINDOW = 0.02
PLAIN_CHARS_PER_TOKEN = 8
"""A text longer than this many characters per token the context allows is counted in
pieces first (see `_encode_within`): real text averages about four."""
COUNT_PIECE_CHARS = 16_384
DISPLACED_MEMORY = 10.0
"""Seconds a place taken by displacement still counts as held once given up."""

Item = Chunk | Final


def _drain(queue: deque[Any]) -> list[Any]:
    """Pop everything another thread has appended so far (deque ops are atomic)."""
    out = []
    while queue:
        out.append(queue.popleft())
    return out


Outbox = list[tuple[int, Chunk | Final | EngineError]]


def plain_chat_prompt(messages: list[dict[str, Any]]) -> str:
    """A chat prompt for models without a chat template: `role: content` lines."""
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


@dataclass(eq=False, slots=True)
class _Slot:
    """Trio-side state of one admitted request."""

    number: int
    request: GenerateRequest
    request_id: str
    prompt: list[int]
    send: trio.MemorySendChannel[Item]
    receive: trio.MemoryReceiveChannel[Item]
    client: str | None = None
    grammar: Any = None
    state: str = "queued"
    displaced_someone: bool = False
    error: EngineError | None = None


@dataclass(frozen=True, slots=True)
class _Job:
    """What the worker thread needs to start a request; `grammar` is its constraint's
    matcher (None without one)."""

    number: int
    request: GenerateRequest
    request_id: str
    prompt: list[int]
    grammar: Any = None


@dataclass(slots=True)
class _Active:
    """Worker-side state of one request in the batch: detokenizer, tool calls, stop strings,
    counts. Text goes through the tool-call reader first, so stop strings apply to content
    only, and a call's text never reaches the client as content."""

    job: _Job
    detokenizer: Any
    stops: StopBuffer
    decode: Any
    token_bytes: Callable[[int], bytes] = lambda _: b""
    tools: ToolCallReader | None = None
    completion_tokens: int = 0
    events: Outbox = field(default_factory=list)

    def on_token(self, token: int, logprobs: Any, finish: str | None) -> bool:
        """Turn one sampled token into events; True when the request is finished."""
        if finish == "stop":
            self.detokenizer.finalize()
            self._emit(self.detokenizer.last_segment, (), None, end=True)
            self.events.append((self.job.number, self._final(FinishReason.STOP)))
            return True
        self.detokenizer.add_token(token)
        if finish == "length":
            self.detokenizer.finalize()
        self.completion_tokens += 1
        lp = (self._logprob(token, logprobs),) if self.job.request.logprobs else None
        hit = self._emit(self.detokenizer.last_segment, (token,), lp, end=finish == "length")
        if hit or finish == "length":
            reason = FinishReason.STOP if hit else FinishReason.LENGTH
            self.events.append((self.job.number, self._final(reason)))
            return True
        return False

    def _emit(
        self,
        segment: str,
        tokens: tuple[int, ...],
        logprobs: tuple[TokenLogprob, ...] | None,
        *,
        end: bool,
    ) -> bool:
        """Queue the chunk for new text (and tokens), then one chunk per tool-call piece;
        True when a stop string matched."""
        calls: list[ToolCallDelta] = []
        if self.tools is not None:
            segment, calls = self.tools.feed(segment)
            if end:
                tail, more = self.tools.finish()
                segment += tail
                calls += more
        text, hit = self.stops.feed(segment)
        if end and not hit:
            text += self.stops.flush()
        number = self.job.number
        if text or tokens:
            self.events.append((number, Chunk(text=text, token_ids=tokens, logprobs=logprobs)))
        self.events.extend(
            (number, Chunk(text="", token_ids=(), tool_calls=(piece,))) for piece in calls
        )
        return hit

    def _final(self, reason: FinishReason) -> Final:
        if reason is FinishReason.STOP and self.tools is not None and self.tools.called:
            reason = FinishReason.TOOL_CALLS
        return Final(
            request_id=self.job.request_id,
            finish_reason=reason,
            prompt_tokens=len(self.job.prompt),
            completion_tokens=self.completion_tokens,
        )

    def _logprob(self, token: int, row: Any) -> TokenLogprob:
        import mlx.core as mx

        chosen = float(row[token].item())
        text = self.decode([token])
        raw = self.token_bytes(token)
        k = self.job.request.top_logprobs
        if not k:
            return TokenLogprob(token=token, logprob=chosen, text=text, token_bytes=raw)
        k = min(k, row.shape[-1])
        ids = mx.argpartition(-row, kth=k - 1)[:k]
        values = row[ids]
        order = mx.argsort(-values)
        top_ids = cast(list[int], ids[order].tolist())
        top_values = cast(list[float], values[order].tolist())
        return TokenLogprob(
            token=token,
            logprob=chosen,
            top=tuple(zip(top_ids, top_values, strict=True)),
            text=text,
            top_text=tuple(self.decode([i]) for i in top_ids),
            token_bytes=raw,
            top_bytes=tuple(self.token_bytes(i) for i in top_ids),
        )


class _MLXGeneration(Generation):
    """Consumer side of one request: admission, then reading its channel."""

    def __init__(self, engine: MLXEngine, request: GenerateRequest, client: str | None) -> None:
        self._engine = engine
        self._request = request
        self._client = client
        self._slot: _Slot | None = None
        self._started = False
        self._done = False
        self._cancelled = False
        self._completion_tokens = 0

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._slot = await self._engine._admit(self._request, self._client)

    async def __anext__(self) -> Item:
        if self._done:
            raise StopAsyncIteration
        await self.start()
        slot = self._slot
        if slot is None:
            raise StopAsyncIteration
        if self._cancelled:
            self._done = True
            return Final(
                request_id=slot.request_id,
                finish_reason=FinishReason.CANCELLED,
                prompt_tokens=len(slot.prompt),
                completion_tokens=self._completion_tokens,
            )
        if slot.error is not None:
            self._done = True
            raise slot.error
        try:
            item = await slot.receive.receive()
        except trio.EndOfChannel:
            self._done = True
            raise slot.error or EngineFailure("generation ended without a final") from None
        except BaseException:
            self.cancel()
            self._done = True
            raise
        if isinstance(item, Final):
            self._done = True
        else:
            self._completion_tokens += len(item.token_ids)
        return item

    def cancel(self) -> None:
        slot = self._slot
        if self._done or self._cancelled or (slot is not None and slot.state == "done"):
            return
        self._cancelled = True
        if slot is None:
            self._done = True
        else:
            self._engine._withdraw(slot)

    async def aclose(self) -> None:
        self.cancel()
        self._done = True


class MLXEngine(Engine):
    """Continuous batching over one mlx-lm model; use as `async with MLXEngine(path) as e`.

    `max_batch` requests decode together; `max_queue` more may wait for a slot; beyond
    that `generate` raises `EngineBusy`. Each consumer may fall `chunk_buffer` chunks
    behind before it is dropped with `SlowConsumer`. `available_memory` overrides the
    measured free memory for the load-time check.
    """

    def __init__(
        self,
        model: Path | str,
        *,
        model_id: str | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
        chunk_buffer: int = DEFAULT_CHUNK_BUFFER,
        prefill_step_size: int = DEFAULT_PREFILL_STEP,
        available_memory: int | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or chunk_buffer < 1 or prefill_step_size < 1:
            raise ValueError("max_batch, chunk_buffer and prefill_step_size must be positive")
        self._path = Path(model)
        self._model_id = model_id
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._chunk_buffer = chunk_buffer
        self._prefill_step = prefill_step_size
        self._available_memory = available_memory
        self._info: ModelInfo | None = None
        self._tokenizer: Any = None
        self._tool_syntax: ToolSyntax | None = None
        self._grammars: Any = None
        self._queue: deque[_Slot] = deque()
        self._running: dict[int, _Slot] = {}
        self._jobs: deque[_Job] = deque()
        self._cancels: deque[int] = deque()
        self._numbers = itertools.count()
        self._slot_turns = ServedOrder(remember=4 * (max_batch + max_queue))
        # Per client: when it gave up places it had taken by displacement.
        self._given_up: dict[str | None, deque[float]] = {}
        self._wakeup = trio.Event()
        self._settled = trio.Event()
        self._admitting: Counter[str | None] = Counter()  # per client, while tokenizing
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._closed = True
        self._tokenizer_turns = Turns()
        self._lifetime_cm: AbstractAsyncContextManager[None] | None = None

    async def __aenter__(self) -> Self:
        if self._lifetime_cm is not None:
            raise RuntimeError("an MLXEngine can be entered only once")
        self._lifetime_cm = self._lifetime()
        await self._lifetime_cm.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._lifetime_cm is not None
        return await self._lifetime_cm.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[None]:
        local = await trio.to_thread.run_sync(
            lambda: inspect_model(self._path, model_id=self._model_id)
        )
        model, tokenizer = await trio.to_thread.run_sync(
            lambda: load_model(local, available=self._available_memory)
        )
        from ._grammar import Grammars

        self._info = local.info
        self._tokenizer = tokenizer
        self._tool_syntax = ToolSyntax.of(tokenizer)
        self._grammars = Grammars(tokenizer, self._tool_syntax)
        self._trio_token = trio.lowlevel.current_trio_token()
        self._closed = False
        raised: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run_worker, model, tokenizer)
            try:
                yield
            except BaseException as exc:
                # Re-raised outside the nursery so the caller's own error is not
                # wrapped in an ExceptionGroup.
                raised = exc
            finally:
                self._shutdown(EngineClosed("the engine is shutting down"))
                nursery.cancel_scope.cancel()
        if raised is not None:
            raise raised

    @property
    def info(self) -> ModelInfo:
        """The served model; available once the engine has started."""
        if self._info is None:
            raise EngineClosed("the engine has not started")
        return self._info

    async def models(self) -> tuple[ModelInfo, ...]:
        await trio.lowlevel.checkpoint()
        return (self.info,)

    def generate(self, request: GenerateRequest, *, client: str | None = None) -> Generation:
        return _MLXGeneration(self, request, client)

    def load(self) -> EngineLoad:
        return EngineLoad(
            active=len(self._running),
            queued=len(self._queue),
            max_batch=self._max_batch,
            max_queue=self._max_queue,
        )

    # ---- trio side -------------------------------------------------------------------

    @property
    def _places(self) -> int:
        """Requests running and queued together, at most."""
        return self._max_batch + self._max_queue

    def _check_open(self, client: str | None, *, displace: bool) -> bool:
        """Room for one more request from `client`, made by displacement if need be;
        True when someone was displaced for it.

        Before tokenizing (`displace` False) this only asks whether there could be room:
        a request that then turns out invalid must not have cost anyone their place.
        Requests still being tokenized count then: otherwise any number could wait for
        the tokenizer, and none would ever hear "busy". After tokenizing they do not
        (each will be checked in its turn), so a request is never refused for one that
        came after it.
        """
        if self._closed:
            raise EngineClosed("the engine is not running")
        waiting = len(self._queue) + (0 if displace else self._admitting.total())
        if len(self._running) + waiting < self._places:
            return False
        if not self._displace_for(client, act=displace):
            raise EngineBusy(f"{len(self._running)} running and {waiting} queued; try another node")
        return displace

    def _displace_for(self, client: str | None, *, act: bool) -> bool:
        """All places are taken: give `client` the last queued place of the client holding
        the most, if that one holds at least two more than `client`. Only when full, so
        the counts are taken here rather than kept.

        Before tokenizing (`act` False), requests still tokenizing count as possible
        victims: by the time this request comes back to displace they are queued or
        gone, and a flood of slow tokenizations cannot hold every place out of reach.
        """
        held = Counter(slot.client for slot in self._queue)
        held.update(slot.client for slot in self._running.values())
        held.update(self._admitting)
        held[client] += self._recently_given_up(client)
        # Newest queued first, so a tie goes to the client that queued last.
        pool = [slot.client for slot in reversed(self._queue)]
        if not act:
            pool += list(self._admitting)
        others = [other for other in pool if other != client]
        if not others:
            return False
        most = max(others, key=held.__getitem__)
        if held[most] <= held[client] + 1:
            return False
        if not act:
            return True
        victim = next(slot for slot in reversed(self._queue) if slot.client == most)
        self._queue.remove(victim)
        self._finish(
            victim,
            EngineBusy(
                f"displaced: your requests held {held[most]} of this node's {self._places} places "
                "and another client had fewer; try another node"
            ),
        )
        return True

    async def _admit(self, request: GenerateRequest, client: str | None) -> _Slot:
        self._check_open(client, displace=False)
        info = self.info
        if request.model != info.id:
            raise UnknownModel(f"this engine serves {info.id!r}, not {request.model!r}")
        if any(token >= info.vocab_size for token, _ in request.logit_bias):
            raise InvalidRequest(
                f"logit_bias names a token id beyond the vocabulary ({info.vocab_size})"
            )
        self._admitting[client] += 1
        try:
            async with self._tokenizer_turns.turn(client):
                if self._closed:  # shut down while this request waited for its turn
                    raise EngineClosed("the engine is not running")
                prompt, grammar = await trio.to_thread.run_sync(self._prepare, request)
        finally:
            self._admitting[client] -= 1
            if not self._admitting[client]:
                del self._admitting[client]
            if not self._admitting:
                self._settled.set()
        if not prompt:
            raise InvalidRequest("the prompt is empty after tokenization")
        if len(prompt) + request.max_tokens > info.context_length:
            raise InvalidRequest(
                f"prompt ({len(prompt)} tokens) plus max_tokens ({request.max_tokens}) exceeds "
                f"the model's context of {info.context_length} tokens"
            )
        # A caller cancelled while its prompt was tokenized must not displace anyone.
        await trio.lowlevel.checkpoint_if_cancelled()
        displaced = self._check_open(client, displace=True)
        send, receive = trio.open_memory_channel[Item](self._chunk_buffer)
        number = next(self._numbers)
        slot = _Slot(
            number=number,
            request=request,
            request_id=request.request_id or secrets.token_hex(16),
            prompt=prompt,
            send=send,
            receive=receive,
            client=client,
            grammar=grammar,
            displaced_someone=displaced,
        )
        self._queue.append(slot)
        self._promote()
        return slot

    def _prepare(self, request: GenerateRequest) -> tuple[list[int], Any]:
        """In a worker thread: the prompt's tokens and the constraint's grammar matcher."""
        prompt = self._encode(request)
        if request.logprobs:
            self._grammars.prepare_bytes()
        return prompt, self._grammars.matcher(request)

    def _encode(self, request: GenerateRequest) -> list[int]:
        tokenizer = self._tokenizer
        if request.offers_tools and self._tool_syntax is None:
            raise InvalidRequest(
                f"the model {self.info.id!r} cannot call tools: its chat template has no "
                "tool-call format this server can parse; send the request without tools"
            )
        if request.messages is not None:
            messages = [m.template_entry() for m in request.messages]
            if tokenizer.has_chat_template:
                tools = (
                    [t.template_entry() for t in request.tools] if request.offers_tools else None
                )
                try:
                    text = tokenizer.apply_chat_template(
                        messages, tools=tools, add_generation_prompt=True, tokenize=False
                    )
                except Exception as exc:
                    raise InvalidRequest(f"the chat template rejected the messages: {exc}") from exc
            else:
                text = plain_chat_prompt(messages)
            return self._encode_within(text, request.max_tokens, add_special_tokens=False)
        prompt = request.prompt or ""
        bos = tokenizer.bos_token
        return self._encode_within(
            prompt, request.max_tokens, add_special_tokens=bos is None or not prompt.startswith(bos)
        )

    def _encode_within(self, text: str, max_tokens: int, *, add_special_tokens: bool) -> list[int]:
        """Tokenize `text`, refusing early one that cannot fit the context.

        Tokenizing costs time and memory in proportion to the text (a 4 MiB prompt: ~4 s
        and ~250 MB, while every other request waits for the tokenizer). So an unusually
        long text is counted in pieces first and refused as soon as it is sure not to
        fit: a request never costs more tokenizing than one that fills the context. Each
        cut between pieces can split at most one token in two, hence the allowance.
        """
        tokenizer = self._tokenizer
        room = self.info.context_length - max_tokens
        if len(text) > PLAIN_CHARS_PER_TOKEN * max(room, 1):
            counted = 0
            for cuts, start in enumerate(range(0, len(text), COUNT_PIECE_CHARS)):
                piece = text[start : start + COUNT_PIECE_CHARS]
                counted += len(tokenizer.encode(piece, add_special_tokens=False))
                if counted - cuts > room:
                    raise InvalidRequest(
                        f"prompt (over {counted - cuts} tokens) plus max_tokens ({max_tokens}) "
                        f"exceeds the model's context of {self.info.context_length} tokens"
                    )
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _promote(self) -> None:
        """Hand queued requests to the worker while the batch has room."""
        promoted = False
        running: Counter[str | None] | None = None
        while self._queue and len(self._running) < self._max_batch and not self._closed:
            if running is None:
                running = Counter(slot.client for slot in self._running.values())
            slot = self._next_queued(running)
            running[slot.client] += 1
            slot.state = "running"
            self._running[slot.number] = slot
            self._jobs.append(
                _Job(slot.number, slot.request, slot.request_id, slot.prompt, slot.grammar)
            )
            promoted = True
        if promoted:
            self._wakeup.set()

    def _next_queued(self, running: Counter[str | None]) -> _Slot:
        """Take the oldest queued request of the client with the fewest `running`; between
        equals, of the one whose last turn is longest ago, so clients take turns."""
        queue = self._queue
        first: dict[str | None, int] = {}
        for i, queued in enumerate(queue):
            first.setdefault(queued.client, i)
        turns = self._slot_turns
        chosen = min(
            first.values(), key=lambda i: (running[queue[i].client], turns.last(queue[i].client), i)
        )
        slot = queue[chosen]
        del queue[chosen]
        turns.note(slot.client)
        return slot

    def _finish(self, slot: _Slot, error: EngineError | None) -> None:
        slot.state = "done"
        slot.error = error
        slot.send.close()
        if self._running.pop(slot.number, None) is not None:
            self._promote()

    def _recently_given_up(self, client: str | None) -> int:
        times = self._given_up.get(client)
        if times is None:
            return 0
        horizon = trio.current_time() - DISPLACED_MEMORY
        while times and times[0] < horizon:
            times.popleft()
        if not times:
            del self._given_up[client]
        return len(times)

    def _remember_given_up(self, client: str | None) -> None:
        if len(self._given_up) > 4 * self._places:
            for other in list(self._given_up):
                self._recently_given_up(other)  # drops the clients with nothing recent
        self._given_up.setdefault(client, deque()).append(trio.current_time())

    def _withdraw(self, slot: _Slot) -> None:
        """The consumer left: drop a queued slot, or ask the worker to drop a running one."""
        if slot.state == "queued":
            self._queue.remove(slot)
            if slot.displaced_someone:
                self._remember_given_up(slot.client)
        elif slot.state == "running":
            self._cancels.append(slot.number)
        else:
            return
        self._finish(slot, None)

    def _shutdown(self, error: EngineError) -> None:
        self._closed = True
        for slot in [*self._queue, *self._running.values()]:
            self._finish(slot, error)
        self._queue.clear()

    def _deliver(self, outbox: Outbox) -> None:
        """Runs in trio (posted by the worker): hand one step's events to their consumers.

        Never waits and never raises: a full channel drops its request with `SlowConsumer`.
        """
        for number, item in outbox:
            slot = self._running.get(number)
            if slot is None:
                continue
            if isinstance(item, EngineError):
                self._finish(slot, item)
                continue
            try:
                slot.send.send_nowait(item)
            except trio.WouldBlock:
                self._cancels.append(number)
                behind = SlowConsumer(f"the reader fell {self._chunk_buffer} chunks behind")
                self._finish(slot, behind)
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._cancels.append(number)
                self._finish(slot, None)
                continue
            if isinstance(item, Final):
                self._finish(slot, None)

    async def _wait_for_jobs(self) -> None:
        """The batch is empty: sleep until a request is handed to the worker.

        Requests that arrive together should share one prefill, so once there is work,
        admissions already under way (tokenizing) get up to `ADMISSION_WINDOW` to join.
        """
        while not self._jobs:
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        with trio.move_on_after(ADMISSION_WINDOW):
            while self._admitting:
                self._settled = trio.Event()
                await self._settled.wait()

    async def _run_worker(self, model: Any, tokenizer: Any) -> None:
        try:
            await trio.to_thread.run_sync(self._worker, model, tokenizer)
        finally:
            self._shutdown(EngineClosed("the engine worker stopped"))

    # ---- worker thread ---------------------------------------------------------------

    def _new_batch(self, model: Any, tokenizer: Any) -> Any:
        from mlx_lm.generate import BatchGenerator

        return BatchGenerator(
            model,
            stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
            completion_batch_size=self._max_batch,
            prefill_batch_size=self._max_batch,
            prefill_step_size=self._prefill_step,
        )

    def _worker(self, model: Any, tokenizer: Any) -> None:
        """The decode loop. It never blocks on trio while it has work: hand-offs come in
        through two deques and results go out through `run_sync_soon`."""
        assert self._trio_token is not None
        token = self._trio_token
        batch = self._new_batch(model, tokenizer)
        active: dict[int, _Active] = {}
        uids: dict[int, int] = {}
        try:
            while True:
                trio.from_thread.check_cancelled()
                # Cancels first: a job is always handed over before its cancel.
                cancels = set(_drain(self._cancels))
                jobs = [job for job in _drain(self._jobs) if job.number not in cancels]
                if not active and not jobs:
                    trio.from_thread.run(self._wait_for_jobs)
                    continue
                outbox: Outbox = []
                try:
                    gone = [uids.pop(n) for n in cancels if n in uids]
                    if gone:
                        batch.remove(gone)
                        for uid in gone:
                            del active[uid]
                    for job in jobs:
                        uid = self._insert(batch, job)
                        uids[job.number] = uid
                        active[uid] = _Active(
                            job=job,
                            detokenizer=tokenizer.detokenizer,
                            decode=tokenizer.decode,
                            stops=StopBuffer(job.request.stop),
                            token_bytes=self._grammars.token_bytes,
                            tools=self._tool_reader(job.request),
                        )
                    if active:
                        self._step(batch, active, uids, outbox)
                except Exception as exc:
                    failure = EngineFailure(f"generation failed: {type(exc).__name__}: {exc}")
                    failed = {a.job.number for a in active.values()} | {j.number for j in jobs}
                    outbox.extend((number, failure) for number in failed)
                    active.clear()
                    uids.clear()
                    batch.close()
                    batch = self._new_batch(model, tokenizer)
                if outbox:
                    token.run_sync_soon(self._deliver, outbox)
        finally:
            batch.close()

    def _tool_reader(self, request: GenerateRequest) -> ToolCallReader | None:
        if not request.offers_tools or self._tool_syntax is None:
            return None
        return ToolCallReader(self._tool_syntax, [t.template_entry() for t in request.tools])

    def _insert(self, batch: Any, job: _Job) -> int:
        from ._sampling import GrammarProcessor, make_request_processors, make_request_sampler

        request = job.request
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        assert self._info is not None
        sampler = make_request_sampler(request, seed=seed, vocab_size=self._info.vocab_size)
        processors = make_request_processors(request)
        if job.grammar is not None:
            processors.append(GrammarProcessor(job.grammar, sorted(self._tokenizer.eos_token_ids)))
        (uid,) = batch.insert(
            [job.prompt],
            max_tokens=[request.max_tokens],
            samplers=[sampler],
            logits_processors=[processors],
        )
        return int(uid)

    def _step(
        self, batch: Any, active: dict[int, _Active], uids: dict[int, int], outbox: Outbox
    ) -> None:
        _, responses = batch.next()
        stopped: list[int] = []
        for response in responses:
            state = active.get(response.uid)
            if state is None:
                continue
            done = state.on_token(response.token, response.logprobs, response.finish_reason)
            outbox.extend(state.events)
            state.events.clear()
            if done:
                del active[response.uid]
                del uids[state.job.number]
                if response.finish_reason is None:
                    stopped.append(response.uid)
        if stopped:
            batch.remove(stopped)
