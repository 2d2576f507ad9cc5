"""The node side of attestation: what it claims, who proves it, and the stream handler."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import trio

from dbloom.p2p import DecodeError, KeyPair, receive_exactly

from ._dev import dev_evidence
from ._errors import AttestationError
from ._evidence import Claims, Evidence, Posture
from ._protocol import (
    HEADER,
    MAX_REQUEST,
    AttestResponse,
    decode_request,
    encode_response,
    frame_length,
)

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0
EVIDENCE_TIMEOUT = 20.0


class EvidenceProvider(Protocol):
    """Turns claims into evidence of one kind (a signature, a helper app, a TPM)."""

    kind: str

    async def evidence(self, claims: Claims) -> Evidence: ...


class DevProvider:
    """Identity-signed evidence, for local networks and tests; clients show it as untrusted."""

    kind = "dev"

    def __init__(self, key: KeyPair) -> None:
        self._key = key

    async def evidence(self, claims: Claims) -> Evidence:
        return dev_evidence(self._key, claims)


@dataclass(slots=True)
class NodeAttester:
    """What this node says about itself; answers each challenge with fresh evidence."""

    key: KeyPair
    provider: EvidenceProvider
    measurement: bytes
    models: Mapping[str, bytes] = field(default_factory=dict)
    posture: Posture = field(default_factory=Posture)
    log_bundle: bytes | None = None

    @property
    def kind(self) -> str:
        return self.provider.kind

    def claims(self, nonce: bytes) -> Claims:
        return Claims(
            peer_id=self.key.peer_id,
            measurement=self.measurement,
            nonce=nonce,
            issued_at_ms=int(time.time() * 1000),
            models=dict(self.models),
            posture=self.posture,
        )

    async def answer(self, nonce: bytes) -> bytes:
        """Encoded evidence for `nonce`, with the log inclusion proof when we have one."""
        evidence = await self.provider.evidence(self.claims(nonce))
        if self.log_bundle is not None:
            evidence = replace(evidence, log=self.log_bundle)
        return evidence.encode()


async def serve_attest(
    stream: trio.abc.HalfCloseableStream,
    attester: NodeAttester,
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    evidence_timeout: float = EVIDENCE_TIMEOUT,
) -> None:
    """Answer one challenge on `stream`, then close it; never raises for the client's doing."""
    try:
        with trio.move_on_after(request_timeout) as scope:
            header = await receive_exactly(stream, HEADER.size)
            payload = await receive_exactly(stream, frame_length(header, MAX_REQUEST))
        if scope.cancelled_caught:
            return
        request = decode_request(payload)
        try:
            with trio.fail_after(evidence_timeout):
                answer = AttestResponse(evidence=await attester.answer(request.nonce))
        except (AttestationError, trio.TooSlowError) as e:
            log.warning("could not produce %s evidence: %s", attester.kind, e)
            answer = AttestResponse(error=f"node could not produce {attester.kind} evidence")
        with trio.move_on_after(request_timeout):
            await stream.send_all(encode_response(answer))
    except (DecodeError, trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
        return
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()
