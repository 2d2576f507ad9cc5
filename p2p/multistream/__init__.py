"""multistream-select 1.0: agree on a protocol for a connection or a stream."""

from ._core import NA as NA
from ._core import NEED_DATA as NEED_DATA
from ._core import PROTOCOL_ID as PROTOCOL_ID
from ._core import LazyProposal as LazyProposal
from ._core import NegotiationFailed as NegotiationFailed
from ._core import Negotiator as Negotiator
from ._core import ProtocolSelected as ProtocolSelected
from ._core import Role as Role
from ._core import encode_message as encode_message
from ._trio import negotiate as negotiate
