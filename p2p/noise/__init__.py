"""Noise XX with the libp2p handshake payload: encrypted, mutually authenticated channels."""

from ._core import PROTOCOL_ID as PROTOCOL_ID
from ._core import AuthenticationError as AuthenticationError
from ._core import HandshakeComplete as HandshakeComplete
from ._core import NoiseHandshake as NoiseHandshake
from ._core import NoiseSession as NoiseSession
from ._core import Role as Role
from ._core import StaticKey as StaticKey
from ._core import choose_muxer as choose_muxer
from ._payload import HandshakePayload as HandshakePayload
from ._trio import NoiseStream as NoiseStream
from ._trio import secure as secure
