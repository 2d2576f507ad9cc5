"""Runs a multistream Negotiator over a trio stream, under a deadline."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from .._errors import ErrorCode, RemoteProtocolError
from ._core import Negotiator, ProtocolSelected, Role

DEFAULT_TIMEOUT = 10.0


async def negotiate(
    stream: trio.abc.Stream,
    role: Role,
    protocols: Sequence[str] | Callable[[str], bool],
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[str, bytes]:
    """Agree on a protocol; return it and any bytes already read past the agreement."""
    negotiator = Negotiator(role, protocols)
    try:
        with trio.fail_after(timeout):
            while True:
                event = negotiator.next_event()
                out = negotiator.data_to_send()
                if out:
                    await stream.send_all(out)
                if isinstance(event, ProtocolSelected):
                    return event.protocol, negotiator.trailing_data()
                data = await stream.receive_some()
                if not data:
                    raise RemoteProtocolError("stream closed during protocol negotiation")
                negotiator.receive_data(data)
    except trio.TooSlowError:
        raise RemoteProtocolError(
            f"protocol negotiation timed out after {timeout}s", ErrorCode.TIMEOUT
        ) from None
