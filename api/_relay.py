"""Relaying one generation to an HTTP client: the status first, then tokens as they come.

The HTTP status is sent only once the engine has produced its first item, so a request
refused or failed before its first token gets a real status code (429, 503, 504…).
After that a failure can only end the stream: with the usage so far (when asked for)
and an error event. Throughout, a task watches the connection; when the client leaves,
the generation is abandoned so the engine frees its batch slot at once.
"""

from __future__ import annotations

import logging
import traceback

import trio
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from dbloom.inference import Chunk, Engine, EngineFailure, Final, FinishReason, Generation

from ._call import Call
from ._errors import ApiError, internal_error, known_error
from ._metrics import Metrics
from ._sse import dumps

CLOSE_TIMEOUT = 5.0
"""How long abandoning a generation may take (a remote engine sends a cancel)."""

logger = logging.getLogger("dbloom.api")


class ClientStalled(Exception):
    """The client stopped reading: a write waited longer than the stall timeout."""


def log_failure(request_id: str, exc: BaseException) -> None:
    """Log an unexpected failure by request id: its type and stack, never its message,
    since a message may quote the prompt."""
    stack = "".join(traceback.format_tb(exc.__traceback__))
    logger.error("request %s failed with %s\n%s", request_id, type(exc).__name__, stack)


def error_for(exc: Exception, request_id: str) -> ApiError:
    """The client-facing error; unexpected ones are logged and become a 500."""
    if isinstance(exc, ApiError):
        return exc
    error = known_error(exc)
    if error is None:
        log_failure(request_id, exc)
        return internal_error(request_id)
    return error


def json_messages(
    status: int, body: object, headers: dict[str, str] | None = None
) -> tuple[Message, Message]:
    """The two ASGI messages of a complete JSON response."""
    fields = {"content-type": "application/json", **(headers or {})}
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [(k.encode(), v.encode()) for k, v in fields.items()],
    }
    return start, {"type": "http.response.body", "body": dumps(body), "more_body": False}


def _body(data: bytes, *, more: bool) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


async def _watch_disconnect(receive: Receive, relay: Relay, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    # The server also reports a disconnect while taking the response's last message;
    # cancelling then would cut short its own bookkeeping (closing the connection).
    if not relay.responded:
        scope.cancel()


class Relay(Response):
    """The response of a generation endpoint: runs the call against the engine."""

    def __init__(self, call: Call, engine: Engine, *, metrics: Metrics, stall: float) -> None:
        self._call = call
        self._engine = engine
        self._metrics = metrics
        self._stall = stall
        self.responded = False
        """True once the response's last message is on its way to the server."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_disconnect, receive, self, nursery.cancel_scope)
                await self._relay(send)
                nursery.cancel_scope.cancel()
        except* ClientStalled:
            logger.info("request %s: the client stopped reading", self._call.request_id)

    async def _send(self, send: Send, message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.responded = True
        try:
            with trio.fail_after(self._stall):
                await send(message)
        except trio.TooSlowError:
            raise ClientStalled from None

    async def _read(self, generation: Generation) -> Chunk | Final:
        """The next item within the stall timeout, chunks added to the call and counted.

        A generation that ends without a final, or with a cancelled one, has failed: the
        shim cancels only for clients that left, and those never see the result.
        """
        with trio.fail_after(self._stall):
            try:
                item = await anext(generation)
            except StopAsyncIteration:
                raise EngineFailure("the generation ended without a final") from None
        if isinstance(item, Final) and item.finish_reason is FinishReason.CANCELLED:
            raise EngineFailure("the generation was cancelled")
        if isinstance(item, Chunk):
            self._call.add(item)
            self._metrics.tokens.labels(self._call.request.model).inc(len(item.token_ids))
        return item

    async def _relay(self, send: Send) -> None:
        call = self._call
        generation = self._engine.generate(call.request)
        began = trio.current_time()
        try:
            try:
                with trio.fail_after(self._stall):
                    await generation.start()
                item = await self._read(generation)
                self._metrics.first_token.observe(trio.current_time() - began)
                headers = {"x-dbloom-node": generation.node} if generation.node else {}
                if call.stream:
                    await self._stream(send, generation, item, headers)
                    return
                while isinstance(item, Chunk):
                    item = await self._read(generation)
                status, body = 200, call.body(item)
            except ClientStalled:
                raise
            except Exception as exc:
                error = error_for(exc, call.request_id)
                status, body, headers = error.status, error.body(), error.headers
            for message in json_messages(status, body, headers):
                await self._send(send, message)
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT):
                await generation.aclose()

    async def _stream(
        self, send: Send, generation: Generation, item: Chunk | Final, headers: dict[str, str]
    ) -> None:
        call = self._call
        fields = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            **headers,
        }
        start: Message = {
            "type": "http.response.start",
            "status": 200,
            "headers": [(k.encode(), v.encode()) for k, v in fields.items()],
        }
        await self._send(send, start)
        events = call.opening()
        try:
            while isinstance(item, Chunk):
                events += call.events(item)
                await self._send(send, _body(b"".join(events), more=True))
                events = []
                item = await self._read(generation)
            events += call.closing(item)
        except ClientStalled:
            raise
        except Exception as exc:
            events += call.failure(error_for(exc, call.request_id))
        await self._send(send, _body(b"".join(events), more=False))
