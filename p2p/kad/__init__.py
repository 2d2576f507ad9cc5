"""Kademlia DHT (libp2p kad-dht wire format): sans-IO cores and the trio service."""

from ._dht import KadConfig as KadConfig
from ._dht import KademliaDHT as KademliaDHT
from ._dht import LookupResult as LookupResult
from ._envelope import NodeEnvelope as NodeEnvelope
from ._envelope import open_node_record as open_node_record
from ._envelope import seal_node_record as seal_node_record
from ._keys import common_prefix_length as common_prefix_length
from ._keys import distance as distance
from ._keys import kad_key as kad_key
from ._keys import node_record_key as node_record_key
from ._keys import peer_key as peer_key
from ._keys import provider_key as provider_key
from ._lookup import Lookup as Lookup
from ._messages import KadMessage as KadMessage
from ._messages import MessageType as MessageType
from ._messages import PeerInfo as PeerInfo
from ._messages import Record as Record
from ._responder import KadResponder as KadResponder
from ._seed import seed_routing_tables as seed_routing_tables
from ._seed import settled_neighbours as settled_neighbours
from ._store import NodeRecordValidator as NodeRecordValidator
from ._store import ProviderStore as ProviderStore
from ._store import RecordRejected as RecordRejected
from ._store import RecordStore as RecordStore
from ._store import Validator as Validator
from ._table import RoutingTable as RoutingTable
