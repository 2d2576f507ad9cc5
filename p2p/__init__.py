"""dbloom.p2p: a libp2p-compatible peer-to-peer stack (TCP + Noise + yamux) on trio.

Protocol cores are sans-IO; trio shells do the I/O. Import from here, not from
the private modules.
"""

from ._errors import DecodeError as DecodeError
from ._errors import ErrorCode as ErrorCode
from ._errors import LimitExceeded as LimitExceeded
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import ProtocolError as ProtocolError
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._host import Connection as Connection
from ._host import DialError as DialError
from ._host import Host as Host
from ._host import HostClosed as HostClosed
from ._host import HostConfig as HostConfig
from ._host import NetStream as NetStream
from ._host import StreamHandler as StreamHandler
from ._host import open_host as open_host
from ._identify import identify as identify
from ._identify_core import IDENTIFY as IDENTIFY
from ._identify_core import IdentifyInfo as IdentifyInfo
from ._identity import KeyPair as KeyPair
from ._identity import KeyType as KeyType
from ._identity import PeerId as PeerId
from ._identity import PublicKey as PublicKey
from ._keyfile import KEY_FILE_NAME as KEY_FILE_NAME
from ._keyfile import KeyFileError as KeyFileError
from ._keyfile import create_identity as create_identity
from ._keyfile import load_identity as load_identity
from ._keyfile import load_or_create_identity as load_or_create_identity
from ._memory import LinkProfile as LinkProfile
from ._memory import MemoryNetwork as MemoryNetwork
from ._memory import MemoryTransport as MemoryTransport
from ._multiaddr import Multiaddr as Multiaddr
from ._multiaddr import MultiaddrError as MultiaddrError
from ._peerstore import PeerStore as PeerStore
from ._ping import PING as PING
from ._ping import ping as ping
from ._streams import receive_exactly as receive_exactly
from ._transport import RawConnection as RawConnection
from ._transport import TcpTransport as TcpTransport
from ._transport import Transport as Transport
