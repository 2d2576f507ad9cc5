"""Raw connection → multistream → Noise → yamux: the libp2p connection upgrade."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from . import _plaintext, multistream, noise
from ._errors import ErrorCode, RemoteProtocolError
from ._identity import KeyPair, PeerId, PublicKey
from ._streams import PrefixedStream
from .yamux import Role as YamuxRole
from .yamux import YamuxConfig, YamuxConnection

YAMUX = "/yamux/1.0.0"
DEFAULT_UPGRADE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Upgraded:
    """An authenticated, multiplexed connection, not yet running."""

    peer_id: PeerId
    public_key: PublicKey
    muxer: YamuxConnection


async def upgrade(
    raw: trio.abc.Stream,
    *,
    initiator: bool,
    identity: KeyPair,
    static_key: noise.StaticKey,
    expected_peer: PeerId | None,
    yamux_config: YamuxConfig,
    write_timeout: float,
    early_muxer: bool = True,
    plaintext: bool = False,
    timeout: float = DEFAULT_UPGRADE_TIMEOUT,
) -> Upgraded:
    """Secure and multiplex `raw` in the order the connections spec requires."""
    ms_role = multistream.Role.INITIATOR if initiator else multistream.Role.RESPONDER
    muxer_proposal: multistream.LazyProposal | None = None
    try:
        with trio.fail_after(timeout):
            if plaintext:
                if initiator:
                    # Everything up to the first yamux frame leaves in one write.
                    muxer_proposal = multistream.LazyProposal(YAMUX)
                    peer, key, rest = await _plaintext.exchange(
                        raw,
                        identity,
                        expected_peer=expected_peer,
                        preamble=multistream.LazyProposal(_plaintext.PROTOCOL_ID),
                        then_send=muxer_proposal.data,
                    )
                else:
                    _, rest = await multistream.negotiate(raw, ms_role, [_plaintext.PROTOCOL_ID])
                    peer, key, rest = await _plaintext.exchange(
                        raw, identity, expected_peer=expected_peer, pending=rest
                    )
                secured: trio.abc.Stream = PrefixedStream(raw, rest) if rest else raw
                muxer = YAMUX if initiator else None
            else:
                rest = b""
                preamble = None
                if initiator:
                    preamble = multistream.LazyProposal(noise.PROTOCOL_ID)
                else:
                    _, rest = await multistream.negotiate(raw, ms_role, [noise.PROTOCOL_ID])
                done, secured = await noise.secure(
                    raw,
                    noise.Role.INITIATOR if initiator else noise.Role.RESPONDER,
                    identity,
                    static_key=static_key,
                    expected_peer=expected_peer,
                    muxers=[YAMUX] if early_muxer else [],
                    pending=rest,
                    preamble=preamble,
                )
                peer, key, muxer = done.peer_id, done.public_key, done.muxer
            stream = secured
            if muxer != YAMUX:
                _, rest = await multistream.negotiate(secured, ms_role, [YAMUX])
                if rest:
                    stream = PrefixedStream(secured, rest)
    except trio.TooSlowError:
        raise RemoteProtocolError(
            f"connection upgrade timed out after {timeout}s", ErrorCode.TIMEOUT
        ) from None
    role = YamuxRole.CLIENT if initiator else YamuxRole.SERVER
    connection = YamuxConnection(
        stream, role, yamux_config, write_timeout=write_timeout, preamble=muxer_proposal
    )
    return Upgraded(peer, key, connection)
