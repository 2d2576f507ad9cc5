"""`NetworkEngine` on a real loopback DHT: shared provider lookups, stale answers served
while one lookup refreshes them, candidates built once per answer, a bounded number of
answers kept, a failed lookup as a 503, and a connection's stream limit as a bounded wait
(or a local refusal), never as the node's failure."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import openai
import pytest
import trio
from node_records import make_offer, make_record

from dbloom.api import _network, create_app, serve_api
from dbloom.api._errors import known_error
from dbloom.api._network import SATURATED_REFRESH, NetworkEngine
from dbloom.api._routing import Router, RoutingPolicy
from dbloom.attest import Attestor, Policy
from dbloom.cli._node import PeerNode, PeerSettings
from dbloom.inference import (
    DIRECTORY_KEY,
    ChatMessage,
    EngineBusy,
    Final,
    GenerateRequest,
    InvalidRequest,
    NodeRecord,
    RequestTimeout,
    model_provider_key,
)
from dbloom.p2p import Host, HostConfig, KeyPair, Multiaddr, NetStream, PeerId, open_host
from dbloom.p2p.kad import KadConfig, KademliaDHT, provider_key
from dbloom.p2p.yamux import YamuxConfig

MODEL = "tiny"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def record(models: tuple[str, ...]) -> NodeRecord:
    offers = tuple(
        make_offer(m, decode_tps=100.0, prefill_tps=500.0, price_in=0, price_out=0) for m in models
    )
    return make_record(models=offers, updated_ms=int(time.time() * 1000))


def address(host: Host) -> str:
    return f"{host.listen_addrs[0]}/p2p/{host.peer_id}"


@dataclass
class Dht:
    """A bootstrap node on loopback; announcers, peers and shim engines join it."""

    nursery: trio.Nursery
    boot: str

    def kad(self, **changes: Any) -> KadConfig:
        return KadConfig(bootstrap=(Multiaddr.parse(self.boot),), **changes)

    async def announcer(self, models: tuple[str, ...] = (MODEL,)) -> PeerId:
        """A DHT server that announces `models` and publishes its record (serves nothing)."""
        peer: PeerId = await self.nursery.start(self._announce, models)
        return peer

    async def _announce(self, models: tuple[str, ...], *, task_status: Any) -> None:
        async with open_host(KeyPair.generate(), listen=[LOOPBACK]) as host:
            dht = KademliaDHT(host, self.kad())
            async with trio.open_nursery() as nursery:
                await nursery.start(dht.run)
                await dht.publish_node_record(record(models).encode())
                for key in [*map(model_provider_key, models), DIRECTORY_KEY]:
                    await dht.provide(provider_key(key))
                task_status.started(host.peer_id)

    async def silent(self) -> Host:
        """A peer that says it serves Kademlia and never answers a query."""
        host: Host = await self.nursery.start(self._silent)
        return host

    async def _silent(self, *, task_status: Any) -> None:
        async def ignore(stream: NetStream) -> None:
            await trio.sleep_forever()

        async with open_host(KeyPair.generate(), listen=[LOOPBACK]) as host:
            host.set_stream_handler(KadConfig().protocol, ignore)
            task_status.started(host)
            await trio.sleep_forever()

    async def peer(self, model_dir: Path) -> PeerNode:
        settings = PeerSettings(
            listen=[LOOPBACK],
            bootstrap=[self.boot],
            models=[str(model_dir)],
            max_batch=8,
            max_queue=64,
            benchmark=False,
            harden=False,
        )
        node = PeerNode(KeyPair.generate(), settings, model_ids={str(model_dir): MODEL})
        await self.nursery.start(node.run)
        return node

    async def engine(
        self, *, background: bool = True, max_streams: int | None = None, **options: Any
    ) -> NetworkEngine:
        engine: NetworkEngine = await self.nursery.start(
            self._engine, background, max_streams, options
        )
        return engine

    async def _engine(
        self,
        background: bool,
        max_streams: int | None,
        options: dict[str, Any],
        *,
        task_status: Any,
    ) -> None:
        config = HostConfig(yamux=YamuxConfig(max_streams=max_streams or 256))
        async with open_host(KeyPair.generate(), config=config) as host:
            dht = KademliaDHT(host, self.kad(mode="client"))
            router = Router(RoutingPolicy(allowed_kinds=frozenset({"dev"})))
            engine = NetworkEngine(dht, Attestor(host, Policy().with_dev()), router, **options)
            async with trio.open_nursery() as nursery:
                await nursery.start(dht.run)
                if background:
                    await nursery.start(engine.run)
                task_status.started(engine)


@asynccontextmanager
async def dht() -> AsyncIterator[Dht]:
    async with (
        open_host(KeyPair.generate(), listen=[LOOPBACK]) as boot,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(KademliaDHT(boot, KadConfig()).run)
        yield Dht(nursery, address(boot))
        nursery.cancel_scope.cancel()


def ask(max_tokens: int = 3) -> GenerateRequest:
    return GenerateRequest(
        model=MODEL,
        messages=(ChatMessage(role="user", content="hello"),),
        max_tokens=max_tokens,
        temperature=0.0,
    )


async def generate(engine: NetworkEngine) -> Final:
    async with engine.generate(ask()) as generation:
        async for item in generation:
            if isinstance(item, Final):
                return item
    raise AssertionError("no final")


async def test_concurrent_requests_share_one_lookup() -> None:
    async with dht() as net:
        a, b = await net.announcer(), await net.announcer()
        engine = await net.engine()
        answers: list[set[PeerId]] = []

        async def one() -> None:
            answers.append({c.peer for c in await engine.candidates(MODEL)})

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
        assert answers == [{a, b}] * 50
        assert engine.lookups == 1
        await engine.candidates(MODEL)
        assert engine.lookups == 1


async def test_a_stale_answer_is_served_while_one_lookup_refreshes_it() -> None:
    async with dht() as net:
        a = await net.announcer()
        engine = await net.engine(providers_ttl=0.2)
        assert {c.peer for c in await engine.candidates(MODEL)} == {a}
        b = await net.announcer()
        await trio.sleep(0.3)
        stale = [{c.peer for c in await engine.candidates(MODEL)} for _ in range(20)]
        assert stale == [{a}] * 20  # a lookup now would have found b
        with trio.fail_after(5):
            while engine.lookups < 2:
                await trio.sleep(0.01)
            while {c.peer for c in await engine.candidates(MODEL)} != {a, b}:
                await trio.sleep(0.01)
        assert engine.lookups == 2


async def test_without_background_work_the_stale_answer_is_refreshed_inline() -> None:
    async with dht() as net:
        a = await net.announcer()
        engine = await net.engine(background=False, providers_ttl=0.2)
        assert {c.peer for c in await engine.candidates(MODEL)} == {a}
        b = await net.announcer()
        await trio.sleep(0.3)
        assert {c.peer for c in await engine.candidates(MODEL)} == {a, b}
        assert engine.lookups == 2


async def test_a_failed_lookup_is_a_503_and_a_cached_answer_outlives_it() -> None:
    async with dht() as net:
        await net.announcer()
        engine = await net.engine(background=False, providers_ttl=0.2, lookup_timeout=0.5)
        assert [m.id for m in await engine.models()] == [MODEL]  # the directory is cached
        assert len(await engine.candidates(MODEL)) == 1
        silent = await net.silent()
        await engine.host.connect(address(silent))
        with trio.fail_after(5):
            while silent.peer_id not in engine.dht.table:
                await trio.sleep(0.01)
        app = create_app(engine, keys=None)
        port = await net.nursery.start(partial(serve_api, app, host="127.0.0.1", port=0))
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        )
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(
                model="elsewhere", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        await client.close()
        assert failed.value.status_code == 503
        assert "lookup" in failed.value.message
        await trio.sleep(0.3)
        assert len(await engine.candidates(MODEL)) == 1  # stale, since the refresh failed


async def test_requests_past_the_stream_limit_wait_for_a_slot(shim_model: Path) -> None:
    async with dht() as net:
        node = await net.peer(shim_model)
        engine = await net.engine(max_streams=36)  # 4 slots once 32 are kept for the rest
        assert engine.streams_per_node == 4
        finals: list[Final] = []
        peak = 0

        async def one() -> None:
            finals.append(await generate(engine))

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, engine.streams_per_node - engine.slot(node.identity.peer_id).value)
                await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as requests:
                for _ in range(40):
                    requests.start_soon(one)
            nursery.cancel_scope.cancel()
        peer = node.identity.peer_id
        assert len(finals) == 40 and peak == 4
        assert engine.router.failures(peer, trio.current_time()) == 0
        assert engine.router.in_flight(peer) == 0
        rtt = engine.router.stats[peer].rtt  # a transport ping, not a time to first token
        assert rtt is not None and rtt < 0.5


async def test_a_full_connection_is_not_the_nodes_failure(shim_model: Path) -> None:
    async with dht() as net:
        node = await net.peer(shim_model)
        engine = await net.engine(max_streams=12, streams_per_node=64)
        outcomes: list[str] = []

        async def one() -> None:
            try:
                await generate(engine)
                outcomes.append("ok")
            except EngineBusy:
                outcomes.append("busy")

        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(one)
        assert "busy" in outcomes and "ok" in outcomes
        assert engine.router.failures(node.identity.peer_id, trio.current_time()) == 0


async def test_the_wait_for_a_stream_slot_is_bounded(shim_model: Path) -> None:
    async with dht() as net:
        node = await net.peer(shim_model)
        engine = await net.engine(streams_per_node=1, queue_timeout=0.2)
        async with engine.generate(ask(max_tokens=64)) as holding:
            await holding.start()  # its stream holds the only slot until it is closed
            with pytest.raises(RequestTimeout, match="no stream to a node came free"):
                await generate(engine)
        assert engine.router.failures(node.identity.peer_id, trio.current_time()) == 0
        assert (await generate(engine)).finish_reason is not None


async def test_when_every_node_is_full_the_shim_looks_for_more(shim_model: Path) -> None:
    async with dht() as net:
        first = await net.peer(shim_model)
        engine = await net.engine(streams_per_node=2, providers_ttl=60)
        async with (
            trio.open_nursery() as nursery,  # left last: its request needs a or b closed
            engine.generate(ask(64)) as a,
            engine.generate(ask(64)) as b,
        ):
            await a.start()  # the lookup is done by now
            looked = trio.current_time()
            await b.start()  # both streams to the first node are taken
            second = await net.peer(shim_model)
            await trio.sleep(max(0.0, looked + SATURATED_REFRESH - trio.current_time()))
            nursery.start_soon(generate, engine)  # waits for a stream to the first node
            with trio.fail_after(5):
                while engine.lookups < 2:
                    await trio.sleep(0.01)
                while len(await engine.candidates(MODEL)) < 2:
                    await trio.sleep(0.01)
            async with engine.generate(ask()) as c:
                await c.start()
                assert c.node == str(second.identity.peer_id)
        assert a.node == b.node == str(first.identity.peer_id)


async def test_a_request_no_node_would_accept_is_a_413_not_busy() -> None:
    # Just under the HTTP body limit, the request to a node (with its receipt fields) is
    # just over the protocol's: answering 429 made SDKs retry what can never succeed.
    async with dht() as d:
        engine = await d.engine()
        huge = GenerateRequest(
            model=MODEL, messages=(ChatMessage(role="user", content="a" * (4 << 20)),)
        )
        with trio.fail_after(10), pytest.raises(InvalidRequest) as info:
            async with engine.generate(huge) as generation:
                await generation.start()
        error = known_error(info.value)
        assert error is not None and error.status == 413
        assert error.body()["error"]["code"] == "request_too_large"


async def test_candidates_are_built_once_per_provider_answer() -> None:
    async with dht() as net:
        await net.announcer()
        engine = await net.engine(providers_ttl=0.2)
        first = await engine.candidates(MODEL)
        again = await engine.candidates(MODEL)
        assert len(first) == 1 and again[0] is first[0]  # addresses were parsed once
        again.clear()  # each caller gets a list of its own
        assert await engine.candidates(MODEL) == first
        await trio.sleep(0.3)
        with trio.fail_after(5):
            while (await engine.candidates(MODEL))[0] is first[0]:
                await trio.sleep(0.01)
        assert engine.lookups == 2  # a new answer, built anew


async def test_a_bounded_number_of_provider_answers_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_network, "MAX_PROVIDER_KEYS", 3)
    models = tuple(f"model-{i}" for i in range(5))
    async with dht() as net:
        await net.announcer(models)
        engine = await net.engine()
        for model in models:
            assert await engine.candidates(model)
        assert engine.lookups == len(models)
        await engine.candidates(models[-1])  # among the three newest: still known
        assert engine.lookups == len(models)
        await engine.candidates(models[0])  # the oldest was let go: looked up again
        assert engine.lookups == len(models) + 1


async def test_expired_records_do_not_pile_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_network, "MAX_CACHED_RECORDS", 4)
    monkeypatch.setattr(_network, "RECORD_TTL", 0.05)
    async with dht() as net:
        engine = await net.engine()
        gone = [KeyPair.generate().peer_id for _ in range(4)]  # peers that left: no record
        for peer in gone:
            assert await engine.record(peer) is None
        assert engine.cached_records == 4
        await trio.sleep(0.1)
        assert await engine.record(KeyPair.generate().peer_id) is None
        assert engine.cached_records == 1  # the four expired answers went
