"""What the router has to say to each peer, packed into as few RPCs as the limits allow.

Control messages piggyback on messages (gossipsub v1.0, "Control Message
Piggybacking"), and every RPC stays within the `RpcLimits` a receiver enforces
(ours are the same as the ones we decode with), so an honest burst is never
refused as oversize by the peer it was meant for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._identity import PeerId
from ._rpc import RPC, Control, Graft, IHave, IWant, Message, Prune, RpcLimits, SubOpts

_ENTRY_OVERHEAD = 12  # tag and length of an entry, plus the control wrapper's share


@dataclass(slots=True)
class _Pending:
    subscriptions: list[SubOpts] = field(default_factory=list)
    graft: list[Graft] = field(default_factory=list)
    prune: list[Prune] = field(default_factory=list)
    ihave: list[IHave] = field(default_factory=list)
    iwant: list[bytes] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)


@dataclass(slots=True)
class _Batch:
    """One RPC being filled, with what it has used of each limit."""

    subscriptions: list[SubOpts] = field(default_factory=list)
    graft: list[Graft] = field(default_factory=list)
    prune: list[Prune] = field(default_factory=list)
    ihave: list[IHave] = field(default_factory=list)
    iwant: list[IWant] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    size: int = 0
    ids: int = 0
    entries: int = 0

    def fits(self, limits: RpcLimits, size: int, ids: int, kind: str) -> bool:
        if self.size + size > limits.max_size or self.ids + ids > limits.max_message_ids:
            return False
        if kind == "subscription":
            return len(self.subscriptions) < limits.max_subscriptions
        if kind == "message":
            return len(self.messages) < limits.max_messages
        return self.entries < limits.max_control_entries

    def rpc(self) -> RPC:
        control = Control(
            ihave=tuple(self.ihave),
            iwant=tuple(self.iwant),
            graft=tuple(self.graft),
            prune=tuple(self.prune),
        )
        return RPC(
            subscriptions=tuple(self.subscriptions),
            publish=tuple(self.messages),
            control=control if control else None,
        )


class Outbox:
    """Pending output per peer, in the order peers were first addressed."""

    __slots__ = ("_pending", "limits")

    def __init__(self, limits: RpcLimits) -> None:
        self.limits = limits
        self._pending: dict[PeerId, _Pending] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def _for(self, peer: PeerId) -> _Pending:
        pending = self._pending.get(peer)
        if pending is None:
            pending = self._pending[peer] = _Pending()
        return pending

    def subscription(self, peer: PeerId, sub: SubOpts) -> None:
        """Announce a subscription change to `peer`."""
        self._for(peer).subscriptions.append(sub)

    def message(self, peer: PeerId, message: Message) -> None:
        """Send a full message to `peer`."""
        self._for(peer).messages.append(message)

    def graft(self, peer: PeerId, topic: str) -> None:
        """Tell `peer` it joined our mesh for `topic`."""
        self._for(peer).graft.append(Graft(topic))

    def prune(self, peer: PeerId, topic: str, backoff: float) -> None:
        """Tell `peer` it left our mesh for `topic`, and for how long not to come back."""
        self._for(peer).prune.append(Prune(topic, backoff=int(backoff)))

    def ihave(self, peer: PeerId, topic: str, message_ids: list[bytes]) -> None:
        """Gossip message ids to `peer`."""
        self._for(peer).ihave.append(IHave(topic, tuple(message_ids)))

    def iwant(self, peer: PeerId, message_ids: list[bytes]) -> None:
        """Ask `peer` for messages it announced."""
        self._for(peer).iwant.extend(message_ids)

    def drop(self, peer: PeerId) -> None:
        """Forget what was pending for a peer that left."""
        self._pending.pop(peer, None)

    def take(self) -> list[tuple[PeerId, RPC]]:
        """Everything pending, as RPCs within the limits; the outbox is then empty."""
        out = [(peer, rpc) for peer, p in self._pending.items() for rpc in self._pack(p)]
        self._pending = {}
        return out

    def _pack(self, pending: _Pending) -> list[RPC]:
        limits = self.limits
        batches = [_Batch()]

        def batch_for(size: int, kind: str, ids: int = 0) -> _Batch:
            size += _ENTRY_OVERHEAD
            batch = batches[-1]
            if not batch.fits(limits, size, ids, kind):
                batch = _Batch()
                batches.append(batch)
            batch.size += size
            batch.ids += ids
            batch.entries += kind == "control"
            return batch

        for sub in pending.subscriptions:
            batch_for(_utf8(sub.topic), "subscription").subscriptions.append(sub)
        for graft in pending.graft:
            batch_for(_utf8(graft.topic), "control").graft.append(graft)
        for prune in pending.prune:
            batch_for(_utf8(prune.topic) + 10, "control").prune.append(prune)
        step = limits.max_message_ids
        for ihave in pending.ihave:
            for start in range(0, len(ihave.message_ids), step):
                ids = ihave.message_ids[start : start + step]
                size = _utf8(ihave.topic) + sum(len(i) + 2 for i in ids)
                batch_for(size, "control", len(ids)).ihave.append(IHave(ihave.topic, ids))
        for start in range(0, len(pending.iwant), step):
            wanted = tuple(pending.iwant[start : start + step])
            size = sum(len(i) + 2 for i in wanted)
            batch_for(size, "control", len(wanted)).iwant.append(IWant(wanted))
        for message in pending.messages:
            batch_for(len(message.raw), "message").messages.append(message)
        return [batch.rpc() for batch in batches if batch.size]


def _utf8(text: str) -> int:
    return len(text.encode())
