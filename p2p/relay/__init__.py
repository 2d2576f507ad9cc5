"""Circuit relay v2: reach peers behind NAT through a relay that sees only ciphertext.

`RelayService` is the relay (`hop`); `RelayClient` holds reservations and accepts
circuits (`stop`); `CircuitTransport`, installed in every host, dials
`/…/p2p/<relay>/p2p-circuit/p2p/<peer>`. `AutoNatService` and `probe` (AutoNAT v1)
tell a peer whether it can be dialed; `AutoRelay` reserves on relays found in the DHT
while it cannot; `HolePunchService` (DCUtR) then replaces relayed connections with
direct ones where the NATs allow. The messages (hop/stop, AutoNAT, DCUtR), vouchers,
the reservation table and the reachability verdict are sans-IO.
"""

from ._autonat import AUTONAT as AUTONAT
from ._autonat import DialRequest as DialRequest
from ._autonat import DialResponse as DialResponse
from ._autonat import DialStatus as DialStatus
from ._autonat import decode_autonat as decode_autonat
from ._autorelay import RELAY_KEY as RELAY_KEY
from ._autorelay import AutoRelay as AutoRelay
from ._autorelay import AutoRelayConfig as AutoRelayConfig
from ._client import HeldReservation as HeldReservation
from ._client import RelayClient as RelayClient
from ._dcutr import DCUTR as DCUTR
from ._dcutr import HolePunch as HolePunch
from ._dcutr import PunchType as PunchType
from ._dialback import AutoNatService as AutoNatService
from ._dialback import dial_candidates as dial_candidates
from ._dialback import probe as probe
from ._holepunch import HolePunchService as HolePunchService
from ._messages import HOP as HOP
from ._messages import STOP as STOP
from ._messages import HopMessage as HopMessage
from ._messages import HopType as HopType
from ._messages import Limit as Limit
from ._messages import Peer as Peer
from ._messages import Reservation as Reservation
from ._messages import Status as Status
from ._messages import StopMessage as StopMessage
from ._messages import StopType as StopType
from ._reachability import Reachability as Reachability
from ._reachability import ReachabilityTracker as ReachabilityTracker
from ._reservations import CircuitBudget as CircuitBudget
from ._reservations import RelayLimits as RelayLimits
from ._reservations import RelayState as RelayState
from ._service import RelayService as RelayService
from ._transport import CircuitTransport as CircuitTransport
from ._transport import RelayRefused as RelayRefused
from ._transport import circuit_addr as circuit_addr
from ._transport import split_circuit as split_circuit
from ._voucher import Voucher as Voucher
from ._voucher import open_voucher as open_voucher
from ._voucher import seal_voucher as seal_voucher
