"""Gossipsub's sans-IO core: the RPC codec, signing, caches, scores and the router's rules."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import pytest
from fuzzing import mutations
from hypothesis import example, given
from hypothesis import strategies as st

from dbloom.p2p import DecodeError, KeyPair, LimitExceeded, LocalProtocolError, PeerId
from dbloom.p2p import _protobuf as pb
from dbloom.p2p.gossip import (
    RPC,
    SIGN_PREFIX,
    Control,
    GossipConfig,
    GossipRouter,
    Graft,
    IHave,
    IWant,
    Message,
    MessageCache,
    MessageRejected,
    Prune,
    PrunePeer,
    RpcLimits,
    SeenCache,
    SubOpts,
    ValidationResult,
    sign_message,
    verify_message,
)
from dbloom.p2p.gossip._signing import signed_bytes

KEY = KeyPair.from_seed(b"\x01" * 32)
OTHER = KeyPair.from_seed(b"\x02" * 32)
TOPIC = "dbloom/receipts/1"


def keys(n: int, seed: int = 0) -> list[KeyPair]:
    rng = random.Random(seed)
    return [KeyPair.from_seed(rng.randbytes(32)) for _ in range(n)]


def full_rpc() -> RPC:
    return RPC(
        subscriptions=(SubOpts(True, TOPIC), SubOpts(False, "old")),
        publish=(sign_message(KEY, TOPIC, b"payload", 7),),
        control=Control(
            ihave=(IHave(TOPIC, (b"a" * 46, b"b" * 46)),),
            iwant=(IWant((b"c" * 46,)),),
            graft=(Graft(TOPIC),),
            prune=(Prune(TOPIC, (PrunePeer(OTHER.peer_id.multihash, b"record"),), 60),),
        ),
    )


# ---- the RPC codec ------------------------------------------------------------------


def test_subscription_bytes_match_go_and_js() -> None:
    # RPC{subscriptions: [{subscribe: true, topicid: "t"}]}, proto2: the bool is always present
    assert RPC(subscriptions=(SubOpts(True, "t"),)).to_bytes() == b"\x0a\x05\x08\x01\x12\x01t"
    assert SubOpts(False, "t").to_bytes() == b"\x08\x00\x12\x01t"


def test_control_bytes() -> None:
    control = Control(graft=(Graft("t"),), prune=(Prune("t", backoff=60),))
    assert RPC(control=control).to_bytes() == (
        b"\x1a\x0c" + b"\x1a\x03\x0a\x01t" + b"\x22\x05\x0a\x01t\x18\x3c"
    )


def test_rpc_round_trip() -> None:
    rpc = full_rpc()
    decoded = RPC.from_bytes(rpc.to_bytes())
    assert decoded == rpc
    assert decoded.publish[0].raw == rpc.publish[0].raw


def test_repeated_control_fields_merge() -> None:
    raw = RPC(control=Control(graft=(Graft("a"),))).to_bytes()
    raw += RPC(control=Control(graft=(Graft("b"),))).to_bytes()
    assert RPC.from_bytes(raw).control == Control(graft=(Graft("a"), Graft("b")))


def test_empty_control_decodes_to_none() -> None:
    assert RPC.from_bytes(b"\x1a\x00") == RPC()


def test_unknown_fields_are_skipped_and_kept_in_the_message_bytes() -> None:
    message = sign_message(KEY, TOPIC, b"x", 1)
    extended = message.raw + pb.encode_message([(99, b"future")])
    raw = pb.encode_message([(2, extended), (7, 5)]) + b"\x1a\x02\x28\x01"  # idontwant-like
    decoded = RPC.from_bytes(raw)
    assert decoded.publish[0].raw == extended
    assert decoded.control is None


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (pb.encode_message([(2, pb.encode_message([(2, b"no topic")]))]), DecodeError),
        (pb.encode_message([(1, pb.encode_message([(1, 1)]))]), DecodeError),
        (pb.encode_message([(3, pb.encode_message([(3, b"")]))]), DecodeError),
        (pb.encode_message([(2, Message(topic="t", data=b"").raw * 2)]), DecodeError),
        (pb.encode_message([(1, SubOpts(True, "t" * 2000).to_bytes())]), LimitExceeded),
        (b"\x0a\x03" + SubOpts(True, "t").to_bytes()[:3], DecodeError),
        (pb.encode_message([(2, b"\x02\x00" + Message(topic="t").raw)]), DecodeError),
    ],
    ids=[
        "message-without-topic",
        "sub-without-topic",
        "graft-without-topic",
        "repeated-field",
        "long-topic",
        "truncated",
        "field-zero",
    ],
)
def test_malformed_rpcs(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        RPC.from_bytes(raw)


def test_limits_are_checked_before_parsing() -> None:
    limits = RpcLimits(max_size=1000, max_subscriptions=2, max_messages=1, max_message_ids=3)
    with pytest.raises(LimitExceeded):
        RPC.from_bytes(b"\x00" * 1001, limits)
    subs = RPC(subscriptions=tuple(SubOpts(True, f"t{i}") for i in range(3)))
    with pytest.raises(LimitExceeded):
        RPC.from_bytes(subs.to_bytes(), limits)
    two = RPC(publish=(Message(topic="a", data=b""), Message(topic="b", data=b"")))
    with pytest.raises(LimitExceeded):
        RPC.from_bytes(two.to_bytes(), limits)
    ids = RPC(control=Control(ihave=(IHave("t", (b"1", b"2")),), iwant=(IWant((b"3", b"4")),)))
    with pytest.raises(LimitExceeded):
        RPC.from_bytes(ids.to_bytes(), limits)
    prune = RPC(control=Control(prune=(Prune("t", (PrunePeer(),) * 65),)))
    with pytest.raises(LimitExceeded):
        RPC.from_bytes(prune.to_bytes())


@given(st.binary(max_size=512))
@example(b"\x12\x80\x80\x80\x80\x01")
def test_rpc_decoder_raises_only_decode_error(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        RPC.from_bytes(raw)


@given(mutations(full_rpc().to_bytes()))
def test_mutated_rpcs_raise_only_decode_error(raw: bytes) -> None:
    with contextlib.suppress(DecodeError):
        RPC.from_bytes(raw)


# ---- signing ------------------------------------------------------------------------


def test_signature_covers_the_message_without_signature_and_key() -> None:
    message = sign_message(KEY, TOPIC, b"data", 1)
    assert message.key is None  # Ed25519 peer ids inline their key
    assert message.from_peer == KEY.peer_id.multihash
    assert message.seqno == b"\x00" * 7 + b"\x01"
    unsigned = pb.encode_message(
        [(1, KEY.peer_id.multihash), (2, b"data"), (3, message.seqno), (4, TOPIC)]
    )
    assert signed_bytes(message.raw) == unsigned
    assert message.signature is not None
    assert KEY.public_key.verify(SIGN_PREFIX + unsigned, message.signature)
    assert verify_message(message) == KEY.peer_id == message.author
    assert message.id == KEY.peer_id.multihash + message.seqno
    with pytest.raises(DecodeError):
        _ = Message(topic=TOPIC).author


def test_an_explicit_key_must_match_the_author() -> None:
    message = sign_message(KEY, TOPIC, b"data", 1)
    with_key = Message.from_bytes(
        Message(
            topic=TOPIC,
            data=b"data",
            from_peer=message.from_peer,
            seqno=message.seqno,
            signature=message.signature,
            key=KEY.public_key.to_bytes(),
        ).raw,
        RpcLimits(),
    )
    assert verify_message(with_key) == KEY.peer_id
    wrong = Message(
        topic=TOPIC,
        data=b"data",
        from_peer=message.from_peer,
        seqno=message.seqno,
        signature=message.signature,
        key=OTHER.public_key.to_bytes(),
    )
    with pytest.raises(MessageRejected, match="does not match"):
        verify_message(wrong)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"signature": None}, "unsigned"),
        ({"seqno": b"\x01"}, "seqno"),
        ({"from_peer": b"\x00\x01"}, "bad author"),
        ({"data": b"tampered"}, "bad signature"),
        ({"topic": "other"}, "bad signature"),
    ],
)
def test_broken_messages_are_rejected(change: dict[str, object], reason: str) -> None:
    message = sign_message(KEY, TOPIC, b"data", 1)
    fields: dict[str, object] = {
        "topic": message.topic,
        "data": message.data,
        "from_peer": message.from_peer,
        "seqno": message.seqno,
        "signature": message.signature,
        **change,
    }
    with pytest.raises(MessageRejected, match=reason):
        verify_message(Message(**fields))  # type: ignore[arg-type]


SIGNED = sign_message(KEY, TOPIC, b"the payload", 42)


@given(mutations(SIGNED.raw))
def test_a_mutated_message_verifies_only_if_its_content_is_unchanged(raw: bytes) -> None:
    try:
        message = Message.from_bytes(raw, RpcLimits())
        author = verify_message(message)
    except (DecodeError, MessageRejected):
        return
    assert author == KEY.peer_id
    assert (message.topic, message.data, message.seqno) == (TOPIC, b"the payload", SIGNED.seqno)


# ---- caches -------------------------------------------------------------------------


def test_seen_cache_forgets_after_its_ttl() -> None:
    seen = SeenCache(ttl=120)
    seen.add(b"a", 0.0)
    seen.add(b"b", 60.0, rejected=True)
    seen.add(b"a", 100.0)  # a repeat does not extend the first sighting
    assert seen.rejected(b"b") and not seen.rejected(b"a")
    seen.expire(119.0)
    assert b"a" in seen
    seen.expire(120.0)
    assert b"a" not in seen and b"b" in seen
    seen.expire(180.0)
    assert len(seen) == 0


def test_message_cache_windows() -> None:
    cache = MessageCache(history=5, gossip=3)
    messages = [sign_message(KEY, TOPIC if i % 2 == 0 else "other", b"", i) for i in range(6)]
    for message in messages:
        cache.put(message.id, message)
        cache.shift()
    # message i sits in window 6 - i: 0 and 1 have left, 2 and 3 are held but not gossiped
    assert cache.get(messages[1].id) is None and cache.get(messages[2].id) is not None
    assert cache.gossip_ids(TOPIC) == [messages[4].id]
    assert cache.gossip_ids("other") == [messages[5].id]
    found = cache.get_for_peer(messages[5].id, OTHER.peer_id)
    assert found is not None and found[1] == 1
    with pytest.raises(ValueError):
        MessageCache(history=2, gossip=3)


# ---- a network of routers fed by hand ------------------------------------------------

Drop = Callable[[PeerId, PeerId, RPC], bool]


class Sim:
    """Routers connected in memory; `pump` delivers RPCs (through the codec) until quiet."""

    def __init__(self, n: int, config: GossipConfig | None = None, seed: int = 0) -> None:
        self.routers = [
            GossipRouter(key, config, rng=random.Random(seed * 1000 + i))
            for i, key in enumerate(keys(n, seed))
        ]
        self.by_id = {r.peer_id: r for r in self.routers}
        self.now = 0.0
        self.sent: list[tuple[PeerId, PeerId, RPC]] = []
        self.delivered: dict[PeerId, list[Message]] = {r.peer_id: [] for r in self.routers}

    def connect(self, a: int, b: int) -> None:
        ra, rb = self.routers[a], self.routers[b]
        ra.peer_connected(rb.peer_id, outbound=True, now=self.now)
        rb.peer_connected(ra.peer_id, outbound=False, now=self.now)

    def connect_all(self) -> None:
        for a in range(len(self.routers)):
            for b in range(a + 1, len(self.routers)):
                self.connect(a, b)

    def pump(self, drop: Drop | None = None) -> None:
        moving = True
        while moving:
            moving = False
            for router in self.routers:
                self.delivered[router.peer_id] += router.take_delivered()
                for peer, rpc in router.take_outgoing():
                    moving = True
                    self.sent.append((router.peer_id, peer, rpc))
                    if drop is None or not drop(router.peer_id, peer, rpc):
                        decoded = RPC.from_bytes(rpc.to_bytes(), router.config.limits)
                        self.by_id[peer].handle_rpc(router.peer_id, decoded, self.now)
        for router in self.routers:
            self.delivered[router.peer_id] += router.take_delivered()

    def heartbeat(self, rounds: int = 1, drop: Drop | None = None) -> None:
        for _ in range(rounds):
            self.now += 1.0
            for router in self.routers:
                router.heartbeat(self.now)
            self.pump(drop)

    def join_all(self, topic: str = TOPIC) -> None:
        for router in self.routers:
            router.join(topic, self.now)
        self.pump()


def test_mesh_stays_within_bounds() -> None:
    sim = Sim(30)
    sim.connect_all()
    sim.join_all()
    sim.heartbeat(5)
    config = sim.routers[0].config
    for router in sim.routers:
        assert config.d_lo <= len(router.mesh_peers(TOPIC)) <= config.d_hi
        # mesh links are symmetric once the GRAFTs and PRUNEs have been processed
        for peer in router.mesh_peers(TOPIC):
            assert router.peer_id in sim.by_id[peer].mesh_peers(TOPIC)


def test_oversubscribed_mesh_is_pruned_to_d_keeping_outbound_peers() -> None:
    sim = Sim(20)
    hub = sim.routers[0]
    for i in range(1, 20):
        sim.connect(0, i) if i >= 17 else sim.connect(i, 0)  # the hub dialed 17-19 only
    sim.join_all()
    for router in sim.routers[1:]:
        router.heartbeat(1.0)  # every peer grafts the hub, its only peer
    sim.pump()
    # inbound GRAFTs fill the mesh to D_hi; outbound ones are accepted beyond it
    assert len(hub.mesh_peers(TOPIC)) == hub.config.d_hi + 3
    hub.heartbeat(2.0)
    sim.pump()
    mesh = hub.mesh_peers(TOPIC)
    assert len(mesh) == hub.config.d
    outbound = {r.peer_id for r in sim.routers[17:]}
    assert len(mesh & outbound) >= hub.config.d_out
    pruned = [
        peer
        for src, peer, rpc in sim.sent
        if src == hub.peer_id and rpc.control and rpc.control.prune
    ]
    assert len(pruned) == 19 - hub.config.d


def test_undersubscribed_mesh_is_refilled() -> None:
    sim = Sim(12)
    sim.connect_all()
    sim.join_all()
    sim.heartbeat(2)
    router = sim.routers[0]
    mesh = sorted(router.mesh_peers(TOPIC))
    for peer in mesh[: len(mesh) - router.config.d_lo + 1]:
        router.peer_disconnected(peer, sim.now)
    assert len(router.mesh_peers(TOPIC)) < router.config.d_lo
    sim.heartbeat()
    assert len(router.mesh_peers(TOPIC)) >= router.config.d


def test_ihave_iwant_recovers_a_missed_message() -> None:
    sim = Sim(8, GossipConfig(d=3, d_lo=2, d_hi=4, d_score=2, d_out=1))
    sim.connect_all()
    sim.join_all()
    sim.heartbeat(3)
    victim = sim.routers[0]
    publisher = next(r for r in sim.routers[1:] if victim.peer_id not in r.mesh_peers(TOPIC))
    message = publisher.publish(TOPIC, b"missed", sim.now)

    def lose_message(src: PeerId, dst: PeerId, rpc: RPC) -> bool:
        return dst == victim.peer_id and bool(rpc.publish)

    sim.pump(drop=lose_message)
    assert [m.data for m in sim.delivered[victim.peer_id]] == []
    sim.heartbeat()  # gossip: IHAVE to non-mesh peers, IWANT back, the message follows
    assert [m.id for m in sim.delivered[victim.peer_id]] == [message.id]
    asked = [rpc for src, _, rpc in sim.sent if src == victim.peer_id and rpc.control]
    assert any(rpc.control and rpc.control.iwant for rpc in asked)
    assert sum(r.stats.iwant_served for r in sim.routers) >= 1
    for router in sim.routers:
        assert [m.id for m in sim.delivered[router.peer_id]] == [message.id]


def test_seen_cache_deduplicates() -> None:
    sim = Sim(8)
    sim.connect_all()
    sim.join_all()
    sim.heartbeat(2)
    message = sim.routers[3].publish(TOPIC, b"once", sim.now)
    sim.pump()
    for router in sim.routers:
        assert [m.id for m in sim.delivered[router.peer_id]] == [message.id]
    assert sum(r.stats.duplicates for r in sim.routers) > 0
    # a late copy from anyone is still a duplicate
    late = sim.routers[5]
    late.handle_rpc(sim.routers[6].peer_id, RPC(publish=(message,)), sim.now)
    assert late.take_delivered() == []


def test_prune_backoff_is_respected_and_early_grafts_are_penalised() -> None:
    sim = Sim(2, GossipConfig(d=1, d_lo=1, d_out=0, d_score=1))
    a, b = sim.routers
    sim.connect(0, 1)
    sim.join_all()
    sim.heartbeat()
    assert a.mesh_peers(TOPIC) == {b.peer_id}
    a.handle_rpc(b.peer_id, RPC(control=Control(prune=(Prune(TOPIC, backoff=30),))), sim.now)
    assert a.mesh_peers(TOPIC) == set()
    a.heartbeat(sim.now + 29)  # still backing off: no GRAFT to b
    assert a.mesh_peers(TOPIC) == set()
    assert all(not (rpc.control and rpc.control.graft) for _, rpc in a.take_outgoing())
    a.heartbeat(sim.now + 31)
    assert a.mesh_peers(TOPIC) == {b.peer_id}
    # b grafting a while a backs off from b: refused with a PRUNE, and penalised
    b.handle_rpc(a.peer_id, RPC(control=Control(prune=(Prune(TOPIC, backoff=60),))), sim.now)
    b.take_outgoing()
    b.handle_rpc(a.peer_id, RPC(control=Control(graft=(Graft(TOPIC),))), sim.now + 1)
    answer = [rpc for peer, rpc in b.take_outgoing() if peer == a.peer_id]
    assert answer and answer[0].control and answer[0].control.prune[0].backoff == 60
    assert a.peer_id not in b.mesh_peers(TOPIC)
    assert b.score(a.peer_id, sim.now + 1) < 0


def test_control_for_topics_we_did_not_join_is_ignored() -> None:
    sim = Sim(2)
    a, b = sim.routers
    sim.connect(0, 1)
    prunes = tuple(Prune(f"made-up-{i}", backoff=3600) for i in range(100))
    a.handle_rpc(b.peer_id, RPC(control=Control(graft=(Graft("unknown"),), prune=prunes)), 0.0)
    assert a.take_outgoing() == []
    assert a._backoff == {}


def test_fanout_when_publishing_to_a_topic_we_did_not_join() -> None:
    config = GossipConfig(flood_publish=False, fanout_ttl=60)
    sim = Sim(11, config)
    sim.connect_all()
    for router in sim.routers[1:]:
        router.join(TOPIC, 0.0)
    sim.pump()
    publisher = sim.routers[0]
    publisher.take_outgoing()
    publisher.publish(TOPIC, b"1", 0.0)
    first = {peer for peer, rpc in publisher.take_outgoing() if rpc.publish}
    assert first == publisher.fanout_peers(TOPIC) and len(first) == config.d
    publisher.publish(TOPIC, b"2", 1.0)
    assert {peer for peer, rpc in publisher.take_outgoing() if rpc.publish} == first
    publisher.heartbeat(30.0)
    assert publisher.fanout_peers(TOPIC) == first
    publisher.heartbeat(62.0)  # no publish for more than fanout_ttl
    assert publisher.fanout_peers(TOPIC) == set()
    # joining moves fanout peers into the mesh
    publisher.publish(TOPIC, b"3", 63.0)
    fanout = publisher.fanout_peers(TOPIC)
    publisher.join(TOPIC, 63.0)
    assert publisher.mesh_peers(TOPIC) == fanout
    assert publisher.fanout_peers(TOPIC) == set()


def test_flood_publish_reaches_every_topic_peer_beyond_the_mesh() -> None:
    sim = Sim(16)
    sim.connect_all()
    sim.join_all()
    sim.heartbeat(2)
    publisher = sim.routers[0]
    assert len(publisher.mesh_peers(TOPIC)) < 15
    publisher.take_outgoing()
    publisher.publish(TOPIC, b"flood", sim.now)
    targets = {peer for peer, rpc in publisher.take_outgoing() if rpc.publish}
    assert targets == {r.peer_id for r in sim.routers[1:]}
    quiet = Sim(16, GossipConfig(flood_publish=False))
    quiet.connect_all()
    quiet.join_all()
    quiet.heartbeat(2)
    publisher = quiet.routers[0]
    publisher.take_outgoing()
    publisher.publish(TOPIC, b"mesh", quiet.now)
    targets = {peer for peer, rpc in publisher.take_outgoing() if rpc.publish}
    assert targets == publisher.mesh_peers(TOPIC)


def forged(author: KeyPair, seqno: int, data: bytes = b"forged") -> Message:
    genuine = sign_message(author, TOPIC, b"genuine", seqno)
    return Message(
        topic=TOPIC,
        data=data,
        from_peer=genuine.from_peer,
        seqno=genuine.seqno,
        signature=genuine.signature,
    )


def test_bad_signature_is_dropped_penalised_and_does_not_shadow_the_real_message() -> None:
    sim = Sim(3)
    sim.connect_all()
    sim.join_all()
    sim.heartbeat(2)
    victim, liar, author = sim.routers
    fake = forged(author.identity, 5)
    victim.handle_rpc(liar.peer_id, RPC(publish=(fake,)), sim.now)
    assert victim.take_delivered() == []
    assert all(not rpc.publish for _, rpc in victim.take_outgoing())
    assert victim.stats.rejected == 1
    assert victim.score(liar.peer_id, sim.now) < 0
    real = sign_message(author.identity, TOPIC, b"genuine", 5)
    assert real.id == fake.id
    victim.handle_rpc(author.peer_id, RPC(publish=(real,)), sim.now)
    assert [m.data for m in victim.take_delivered()] == [b"genuine"]


def test_invalid_messages_graylist_the_sender_until_its_score_decays() -> None:
    sim = Sim(3)
    sim.connect_all()
    sim.join_all()
    sim.heartbeat(2)
    victim, liar, _ = sim.routers
    thresholds = victim.config.thresholds
    for seqno in range(3):  # P₄ = -10 × 3²
        victim.handle_rpc(liar.peer_id, RPC(publish=(forged(liar.identity, seqno),)), sim.now)
    assert victim.score(liar.peer_id, sim.now) < thresholds.graylist
    honest = sign_message(liar.identity, TOPIC, b"now honest", 100)
    victim.handle_rpc(liar.peer_id, RPC(publish=(honest,)), sim.now)
    assert victim.take_delivered() == [] and victim.stats.graylisted_rpcs == 1
    sim.heartbeat()
    assert liar.peer_id not in victim.mesh_peers(TOPIC)  # negative score: pruned
    # reconnecting does not wash the score
    victim.peer_disconnected(liar.peer_id, sim.now)
    victim.peer_connected(liar.peer_id, outbound=False, now=sim.now)
    assert victim.score(liar.peer_id, sim.now) < thresholds.graylist
    for _ in range(120):  # P₄ decays by 1% a heartbeat
        sim.now += 1
        victim.heartbeat(sim.now)
    assert victim.score(liar.peer_id, sim.now) > thresholds.graylist
    victim.handle_rpc(liar.peer_id, RPC(publish=(honest,)), sim.now)
    assert [m.data for m in victim.take_delivered()] == [b"now honest"]


def test_validator_verdicts() -> None:
    sim = Sim(3)
    sim.connect_all()
    sim.join_all()
    sim.heartbeat(2)
    victim, sender, author = sim.routers
    verdicts = {b"ok": ValidationResult.ACCEPT, b"bad": ValidationResult.REJECT}
    victim.set_validator(TOPIC, lambda peer, m: verdicts.get(m.data, ValidationResult.IGNORE))
    messages = [
        sign_message(author.identity, TOPIC, d, i) for i, d in enumerate([b"ok", b"bad", b"meh"])
    ]
    victim.handle_rpc(sender.peer_id, RPC(publish=tuple(messages)), sim.now)
    assert [m.data for m in victim.take_delivered()] == [b"ok"]
    assert (victim.stats.rejected, victim.stats.ignored) == (1, 1)
    before = victim.score(sender.peer_id, sim.now)
    assert before < 0  # the rejection outweighs the one first delivery
    # a second copy of the rejected message costs its sender too; the ignored one does not
    victim.handle_rpc(author.peer_id, RPC(publish=(messages[1], messages[2])), sim.now)
    assert victim.score(author.peer_id, sim.now) < 0
    victim.set_validator(TOPIC, None)


def test_a_validator_that_raises_ignores_the_message() -> None:
    sim = Sim(2)
    sim.connect_all()
    sim.join_all()
    victim, sender = sim.routers

    def broken(peer: PeerId, message: Message) -> ValidationResult:
        raise RuntimeError("bug")

    victim.set_validator(TOPIC, broken)
    victim.handle_rpc(
        sender.peer_id, RPC(publish=(sign_message(sender.identity, TOPIC, b"", 1),)), 0
    )
    assert victim.take_delivered() == [] and victim.stats.ignored == 1


def test_ihave_is_capped_and_broken_promises_are_penalised() -> None:
    config = GossipConfig(max_ihave_messages=2, max_ihave_length=3, iwant_followup_time=3)
    sim = Sim(2, config)
    a, b = sim.routers
    sim.connect(0, 1)
    sim.join_all()
    a.take_outgoing()
    ids = [bytes([i]) * 46 for i in range(10)]
    ihaves = tuple(IHave(TOPIC, tuple(ids[i : i + 2])) for i in range(0, 10, 2))
    a.handle_rpc(b.peer_id, RPC(control=Control(ihave=ihaves)), 0.0)
    asked = [
        i
        for _, rpc in a.take_outgoing()
        if rpc.control
        for w in rpc.control.iwant
        for i in w.message_ids
    ]
    assert len(asked) == 3  # max_ihave_length ids from at most max_ihave_messages IHAVEs
    assert set(asked) <= set(ids[:4])
    a.heartbeat(2.0)
    assert a.score(b.peer_id, 2.0) >= 0
    a.heartbeat(4.0)  # nothing delivered within iwant_followup_time: promises broken
    assert a.stats.broken_promises == 2
    assert a.score(b.peer_id, 4.0) < 0


def test_ihave_for_seen_messages_asks_nothing() -> None:
    sim = Sim(2)
    a, b = sim.routers
    sim.connect(0, 1)
    sim.join_all()
    message = b.publish(TOPIC, b"x", 0.0)
    sim.pump()
    a.handle_rpc(b.peer_id, RPC(control=Control(ihave=(IHave(TOPIC, (message.id,)),))), 0.0)
    assert a.take_outgoing() == []


def test_iwant_answers_are_limited_per_peer() -> None:
    sim = Sim(2, GossipConfig(gossip_retransmission=2))
    a, b = sim.routers
    sim.connect(0, 1)
    message = a.publish(TOPIC, b"x", 0.0)
    a.take_outgoing()
    for _ in range(4):
        a.handle_rpc(b.peer_id, RPC(control=Control(iwant=(IWant((message.id, b"gone")),))), 0.0)
    sent = [rpc for _, rpc in a.take_outgoing() for _ in rpc.publish]
    assert len(sent) == 2 and a.stats.iwant_served == 2


def test_gossip_goes_to_non_mesh_peers_only() -> None:
    sim = Sim(20, GossipConfig(d_lazy=30))
    sim.connect_all()
    sim.join_all()
    sim.heartbeat(2)
    router = sim.routers[0]
    message = router.publish(TOPIC, b"x", sim.now)
    sim.pump()
    router.heartbeat(sim.now + 1)
    gossiped = {
        peer
        for peer, rpc in router.take_outgoing()
        if rpc.control and any(message.id in i.message_ids for i in rpc.control.ihave)
    }
    mesh = router.mesh_peers(TOPIC)
    assert gossiped == {r.peer_id for r in sim.routers[1:]} - mesh


def test_unsubscribe_prunes_the_mesh_and_tells_everyone() -> None:
    sim = Sim(8)
    sim.connect_all()
    sim.join_all()
    sim.heartbeat(2)
    leaver = sim.routers[0]
    mesh = leaver.mesh_peers(TOPIC)
    leaver.leave(TOPIC, sim.now)
    out = leaver.take_outgoing()
    assert {p for p, rpc in out if SubOpts(False, TOPIC) in rpc.subscriptions} == {
        r.peer_id for r in sim.routers[1:]
    }
    pruned = {p for p, rpc in out if rpc.control and rpc.control.prune}
    assert pruned == mesh
    backoffs = {rpc.control.prune[0].backoff for _, rpc in out if rpc.control}
    assert backoffs == {int(leaver.config.unsubscribe_backoff)}
    assert leaver.topics == []


def test_messages_on_topics_we_did_not_join_are_not_delivered() -> None:
    sim = Sim(2)
    a, b = sim.routers
    sim.connect(0, 1)
    a.handle_rpc(b.peer_id, RPC(publish=(sign_message(b.identity, "elsewhere", b"", 1),)), 0)
    assert a.take_delivered() == [] and a.stats.ignored == 1


def test_our_own_message_echoed_back_is_a_duplicate_not_an_offence() -> None:
    sim = Sim(2)
    a, b = sim.routers
    sim.connect(0, 1)
    sim.join_all()
    message = a.publish(TOPIC, b"mine", 0.0)
    a.take_delivered()
    a.handle_rpc(b.peer_id, RPC(publish=(message,)), 0.0)
    assert a.take_delivered() == [] and a.stats.duplicates == 1
    assert a.score(b.peer_id, 0.0) == 0


def test_oversize_publish_is_refused() -> None:
    router = GossipRouter(KEY, GossipConfig(limits=RpcLimits(max_size=1024)))
    with pytest.raises(LocalProtocolError):
        router.publish(TOPIC, b"x" * 1024, 0.0)


def test_output_is_packed_within_the_receivers_limits() -> None:
    limits = RpcLimits(max_size=4096, max_messages=3, max_message_ids=5, max_control_entries=2)
    sim = Sim(2, GossipConfig(limits=limits))
    a, b = sim.routers
    sim.connect(0, 1)
    sim.join_all()
    a.take_outgoing()
    for i in range(10):
        a.publish(TOPIC, bytes([i]) * 1000, 0.0)
    a.handle_rpc(
        b.peer_id,
        RPC(control=Control(ihave=(IHave(TOPIC, tuple(bytes([i]) * 8 for i in range(4))),))),
        0.0,
    )
    a.handle_rpc(
        b.peer_id,
        RPC(control=Control(ihave=(IHave(TOPIC, tuple(bytes([i]) * 8 for i in range(4, 8))),))),
        0.0,
    )
    out = a.take_outgoing()
    assert len(out) > 3
    for _, rpc in out:
        RPC.from_bytes(rpc.to_bytes(), limits)  # every piece decodes under the limits
    assert sum(len(rpc.publish) for _, rpc in out) == 10


def test_same_seed_same_behaviour() -> None:
    def run() -> list[bytes]:
        sim = Sim(10, seed=3)
        sim.connect_all()
        sim.join_all()
        sim.heartbeat(3)
        for i in range(5):
            sim.routers[i].publish(TOPIC, bytes([i]), sim.now)
            sim.pump()
        sim.heartbeat(2)
        return [rpc.to_bytes() for _, _, rpc in sim.sent]

    assert run() == run()


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        GossipConfig(d=6, d_lo=7)
    with pytest.raises(ValueError):
        GossipConfig(d_out=4)
