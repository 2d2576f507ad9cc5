"""`/dbloom/infer` over any trio stream: the node's handler and the client.

Both work on a `trio.abc.HalfCloseableStream` (a TCP socket today, a yamux stream on the
libp2p host tomorrow) and own it: they close it when the exchange ends.

The node reads one request under a deadline, then streams the generation while a watcher
task reads the client side: EOF, a reset or stray bytes cancel the generation at once.
Writes never hold up the batch: if the client reads too slowly, the engine's bounded
per-request buffer fills, the request is dropped with `SlowConsumer`, and a stalled write
gives up after `send_timeout`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence

import trio

from ._engine import Engine
from ._errors import (
    EngineError,
    EngineFailure,
    ProtocolFailure,
    RequestTimeout,
    error_for_code,
)
from ._events import Chunk, Final
from ._protocol import (
    CLIENT_CLOSED,
    DEFAULT_MAX_CHUNK,
    DEFAULT_MAX_REQUEST,
    NEED_DATA,
    DecodeError,
    ErrorMessage,
    InferClient,
    InferServer,
    LocalProtocolError,
)
from ._request import GenerateRequest

DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_SEND_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 300.0
CLOSE_TIMEOUT = 5.0
RECEIVE_SIZE = 1 << 16

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)

ReceiptSigner = Callable[[GenerateRequest, Final, Sequence[int], int], bytes | None]
"""(request, final, token ids sent, start in ms) -> the node-signed receipt, or None."""


async def serve_infer(
    stream: trio.abc.HalfCloseableStream,
    engine: Engine,
    *,
    max_request_size: int = DEFAULT_MAX_REQUEST,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    send_timeout: float = DEFAULT_SEND_TIMEOUT,
    sign_receipt: ReceiptSigner | None = None,
    client: str | None = None,
) -> None:
    """Answer one request on `stream` with `engine`, then close the stream.

    Never raises for anything the client does: bad frames and refusals become Error
    frames, a vanished client just ends the generation. With `sign_receipt`, a request
    that names an account and an id gets the node's signed receipt in its `Final`.
    `client` (the remote peer id on a node) is who the engine shares its places among.
    """
    core = InferServer(max_request_size=max_request_size)
    try:
        try:
            with trio.fail_after(request_timeout):
                request = await _read_request(stream, core)
        except DecodeError as exc:
            await _send_error(stream, core, ErrorMessage(code=exc.reply, message=str(exc)))
            return
        except trio.TooSlowError:
            await _send_error(stream, core, ErrorMessage.from_error(RequestTimeout("no request")))
            return
        except _GONE:
            return
        if request is None:
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_client, stream, core, nursery.cancel_scope)
            error = await _stream_generation(
                stream, core, engine, request, send_timeout, sign_receipt, client
            )
            if error is not None:
                await _send_error(stream, core, ErrorMessage.from_error(error))
            nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT):
            await stream.aclose()


async def _read_request(
    stream: trio.abc.HalfCloseableStream, core: InferServer
) -> GenerateRequest | None:
    while True:
        event = core.next_event()
        if isinstance(event, GenerateRequest):
            return event
        if event is CLIENT_CLOSED:
            return None
        core.receive_data(await stream.receive_some(RECEIVE_SIZE))


async def _watch_client(
    stream: trio.abc.HalfCloseableStream, core: InferServer, scope: trio.CancelScope
) -> None:
    """Cancel the generation when the client closes, resets or breaks the protocol."""
    try:
        while core.next_event() is NEED_DATA:
            core.receive_data(await stream.receive_some(RECEIVE_SIZE))
    except (DecodeError, *_GONE):
        pass
    scope.cancel()


async def _stream_generation(
    stream: trio.abc.HalfCloseableStream,
    core: InferServer,
    engine: Engine,
    request: GenerateRequest,
    send_timeout: float,
    sign_receipt: ReceiptSigner | None,
    client: str | None,
) -> EngineError | None:
    """Send every item; return the error to report, if any."""
    wants_receipt = sign_receipt is not None and request.account and request.request_id
    started_ms = int(time.time() * 1000)
    token_ids: list[int] = []
    try:
        async with engine.generate(request, client=client) as generation:
            async for item in generation:
                if wants_receipt:
                    if isinstance(item, Chunk):
                        token_ids.extend(item.token_ids)
                    elif sign_receipt is not None:
                        receipt = sign_receipt(request, item, token_ids, started_ms)
                        item = dataclasses.replace(item, receipt=receipt)
                with trio.fail_after(send_timeout):
                    await stream.send_all(core.send(item))
    except EngineError as exc:
        return exc
    except trio.TooSlowError:
        return RequestTimeout(f"the client read nothing for {send_timeout} s")
    except LocalProtocolError as exc:
        return EngineFailure(f"cannot frame the response: {exc}")
    except _GONE:
        return None
    return None


async def _send_error(
    stream: trio.abc.HalfCloseableStream, core: InferServer, message: ErrorMessage
) -> None:
    if core.finished:
        return
    with trio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(*_GONE):
        await stream.send_all(core.send(message))


async def infer(
    stream: trio.abc.HalfCloseableStream,
    request: GenerateRequest,
    *,
    max_chunk_size: int = DEFAULT_MAX_CHUNK,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
) -> AsyncIterator[Chunk | Final]:
    """Send `request` and yield the node's chunks and then its `Final`; closes `stream`.

    A node's Error frame is raised as the matching `EngineError` (`EngineBusy`, ...);
    a broken stream or protocol as `ProtocolFailure`; silence longer than `idle_timeout`
    as `RequestTimeout`. Closing the iterator early (use `contextlib.aclosing`) closes
    the stream, which cancels the request on the node.
    """
    core = InferClient(max_chunk_size=max_chunk_size)
    finished = False
    try:
        await stream.send_all(core.send_request(request))
        while not finished:
            event = core.next_event()
            if event is NEED_DATA:
                with trio.fail_after(idle_timeout):
                    data = await stream.receive_some(RECEIVE_SIZE)
                core.receive_data(data)
                continue
            if isinstance(event, ErrorMessage):
                finished = True
                raise error_for_code(event.code, event.message)
            assert isinstance(event, Chunk | Final)
            finished = isinstance(event, Final)
            yield event
    except DecodeError as exc:
        raise ProtocolFailure(f"bad response from the node: {exc}") from None
    except trio.TooSlowError:
        raise RequestTimeout(f"the node sent nothing for {idle_timeout} s") from None
    except _GONE as exc:
        raise ProtocolFailure(f"the stream broke before the final: {exc!r}") from None
    finally:
        if finished:
            await stream.aclose()
        else:
            await trio.aclose_forcefully(stream)
