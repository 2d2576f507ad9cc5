"""The client side: challenge a node over the connection we will use, verify, cache.

`Attestor.verdict(conn)` is called before any inference stream is opened on `conn`. It
sends a fresh nonce, verifies the answer against the client's policy, and remembers the
verdict for that connection (not for the peer: a new connection is a new session) until
it is `reattest_after` seconds old. Concurrent callers for one connection share a single
challenge.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping

import trio

from dbloom.p2p import Connection, DecodeError, Host, ProtocolError, receive_exactly

from ._errors import AttestationError, AttestationRefused
from ._evidence import NONCE_SIZE
from ._kinds import Verifier, VerifierState
from ._policy import Policy, Verdict, verify_evidence
from ._protocol import (
    HEADER,
    MAX_RESPONSE,
    PROTOCOL_ID,
    AttestRequest,
    decode_response,
    encode_request,
    frame_length,
)
from ._registry import default_verifiers

log = logging.getLogger(__name__)

REATTEST_AFTER = 300.0
CHALLENGE_TIMEOUT = 10.0


async def challenge(conn: Connection, nonce: bytes, *, timeout: float = CHALLENGE_TIMEOUT) -> bytes:
    """Send `nonce` on a new `/dbloom/attest` stream of `conn`; the node's evidence bytes."""
    try:
        with trio.fail_after(timeout):
            stream = await conn.new_stream([PROTOCOL_ID], lazy=True)
            try:
                await stream.send_all(encode_request(AttestRequest(nonce)))
                header = await receive_exactly(stream, HEADER.size)
                payload = await receive_exactly(stream, frame_length(header, MAX_RESPONSE))
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await stream.aclose()
    except trio.TooSlowError:
        raise AttestationError(f"{conn.peer_id.short()} did not answer the challenge") from None
    except (DecodeError, ProtocolError, EOFError, trio.BrokenResourceError) as e:
        raise AttestationError(f"{conn.peer_id.short()} gave no evidence: {e}") from None
    try:
        response = decode_response(payload)
    except DecodeError as e:
        raise AttestationError(f"{conn.peer_id.short()} sent a malformed answer: {e}") from None
    if response.evidence is None:
        raise AttestationError(f"{conn.peer_id.short()}: {response.error}")
    return response.evidence


class Attestor:
    """Verifies nodes for one client; verdicts cached per connection."""

    def __init__(
        self,
        host: Host,
        policy: Policy,
        *,
        verifiers: Mapping[str, Verifier] | None = None,
        reattest_after: float = REATTEST_AFTER,
        timeout: float = CHALLENGE_TIMEOUT,
    ) -> None:
        self.host = host
        self.policy = policy
        self.verifiers = verifiers if verifiers is not None else default_verifiers()
        self.reattest_after = reattest_after
        self.timeout = timeout
        self.state = VerifierState()
        self._verdicts: dict[Connection, tuple[float, Verdict]] = {}
        self._pending: dict[Connection, trio.Event] = {}
        host.add_connection_listener(self._on_connection)

    def _on_connection(self, conn: Connection, opened: bool) -> None:
        if not opened:
            self._verdicts.pop(conn, None)

    def cached(self, conn: Connection) -> Verdict | None:
        """The verdict for `conn` if it is still fresh."""
        entry = self._verdicts.get(conn)
        if entry is None or conn.is_closed:
            return None
        if trio.current_time() - entry[0] > self.reattest_after:
            return None
        return entry[1]

    async def verdict(self, conn: Connection) -> Verdict:
        """The (possibly cached) verdict for `conn`; raises `AttestationRefused` if refused."""
        while True:
            verdict = self.cached(conn)
            if verdict is not None:
                break
            pending = self._pending.get(conn)
            if pending is None:
                verdict = await self._attest(conn)
                break
            await pending.wait()
            if conn not in self._verdicts:
                raise AttestationError(f"attestation of {conn.peer_id.short()} failed")
        if not verdict.accepted:
            raise AttestationRefused(verdict)
        return verdict

    async def _attest(self, conn: Connection) -> Verdict:
        done = self._pending[conn] = trio.Event()
        try:
            nonce = secrets.token_bytes(NONCE_SIZE)
            raw = await challenge(conn, nonce, timeout=self.timeout)
            verdict = verify_evidence(
                raw,
                policy=self.policy,
                peer=conn.peer_id,
                nonce=nonce,
                verifiers=self.verifiers,
                state=self.state,
            )
            if not conn.is_closed:
                self._verdicts[conn] = (trio.current_time(), verdict)
            log.debug("attestation of %s: %s", conn.peer_id.short(), verdict)
            return verdict
        finally:
            del self._pending[conn]
            done.set()
