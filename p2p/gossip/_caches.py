"""The two message caches of gossipsub: ids seen lately, and messages we can gossip about.

Sans-IO and bounded by time: `SeenCache` forgets an id `ttl` seconds after first
seeing it; `MessageCache` holds the messages of the last `history` heartbeats and
announces those of the last `gossip` heartbeats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._identity import PeerId
from ._rpc import Message


class SeenCache:
    """Message ids seen in the last `ttl` seconds, and whether the validator rejected each."""

    __slots__ = ("_entries", "ttl")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        # id -> (expiry, rejected); insertion order is expiry order because ttl is fixed
        self._entries: dict[bytes, tuple[float, bool]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, message_id: bytes) -> bool:
        return message_id in self._entries

    def add(self, message_id: bytes, now: float, *, rejected: bool = False) -> None:
        """Remember `message_id` from `now` (a repeat keeps its first expiry)."""
        if message_id not in self._entries:
            self._entries[message_id] = (now + self.ttl, rejected)

    def rejected(self, message_id: bytes) -> bool:
        """True if the message was seen and refused by its topic's validator."""
        entry = self._entries.get(message_id)
        return entry is not None and entry[1]

    def expire(self, now: float) -> None:
        """Forget ids whose time is up."""
        entries = self._entries
        while entries:
            message_id = next(iter(entries))
            if entries[message_id][0] > now:
                return
            del entries[message_id]


@dataclass(slots=True)
class _Cached:
    message: Message
    sent_to: dict[PeerId, int] = field(default_factory=dict)  # IWANT answers per peer


class MessageCache:
    """The mcache: messages by id in heartbeat windows, newest window first."""

    __slots__ = ("_messages", "_windows", "gossip", "history")

    def __init__(self, history: int, gossip: int) -> None:
        if not 0 < gossip <= history:
            raise ValueError("need 0 < gossip windows <= history windows")
        self.history = history
        self.gossip = gossip
        self._messages: dict[bytes, _Cached] = {}
        self._windows: list[list[tuple[bytes, str]]] = [[] for _ in range(history)]

    def __len__(self) -> int:
        return len(self._messages)

    def put(self, message_id: bytes, message: Message) -> None:
        """Add a message to the current window."""
        if message_id not in self._messages:
            self._messages[message_id] = _Cached(message)
            self._windows[0].append((message_id, message.topic))

    def get(self, message_id: bytes) -> Message | None:
        """The cached message, if it is still held."""
        cached = self._messages.get(message_id)
        return cached.message if cached is not None else None

    def get_for_peer(self, message_id: bytes, peer: PeerId) -> tuple[Message, int] | None:
        """The message for an IWANT from `peer`, and how many times `peer` has now asked."""
        cached = self._messages.get(message_id)
        if cached is None:
            return None
        count = cached.sent_to.get(peer, 0) + 1
        cached.sent_to[peer] = count
        return cached.message, count

    def gossip_ids(self, topic: str) -> list[bytes]:
        """Ids of messages on `topic` in the newest `gossip` windows."""
        return [mid for window in self._windows[: self.gossip] for mid, t in window if t == topic]

    def shift(self) -> None:
        """Open a new window and drop the oldest one's messages."""
        for message_id, _ in self._windows.pop():
            self._messages.pop(message_id, None)
        self._windows.insert(0, [])
