"""`dbloom demo`: a small network on loopback, shown step by step.

Three peers run the DHT; two of them serve a generated tiny model; a client finds
them through the DHT and streams an answer over an encrypted channel. (The OpenAI
shim arrives with the peer/shim issue; this shows the layers under it.)
"""

from __future__ import annotations

import tempfile
from contextlib import AsyncExitStack, aclosing
from pathlib import Path

import trio

from dbloom.inference import (
    PROTOCOL_ID,
    Final,
    GenerateRequest,
    MLXEngine,
    build_tiny_model,
    infer,
    serve_infer,
)
from dbloom.p2p import Host, KeyPair, NetStream, PeerId, identify, open_host, ping
from dbloom.p2p.kad import KadConfig, KademliaDHT, provider_key

from ._common import console, run

MODEL = "tiny"
PROMPT = "Explain how decentralized AI inference improves privacy."


def demo() -> None:
    """Peers on 127.0.0.1 find a model through the DHT and stream an answer, encrypted."""

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            console.rule("[bold]dbloom demo: a small network on loopback")
            model_dir = build_tiny_model(Path(tmp) / MODEL, size="tiny")
            console.print(f"generated model {MODEL!r} (random weights: its text is meaningless)")
            await _network(model_dir)

    run(main)


async def _network(model_dir: Path) -> None:
    async with AsyncExitStack() as stack:
        hosts: list[Host] = [
            await stack.enter_async_context(
                open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"])
            )
            for _ in range(3)
        ]
        for name, host in zip(("bootstrap", "node-1", "node-2"), hosts, strict=True):
            console.print(f"[bold]{name:9}[/bold] {host.listen_addrs[0]}")
        nursery = await stack.enter_async_context(trio.open_nursery())
        dhts = []
        for i, host in enumerate(hosts):
            boot = (hosts[0].listen_addrs[0],) if i else ()
            dht = KademliaDHT(host, KadConfig(bootstrap=boot))
            await nursery.start(dht.run)
            dhts.append(dht)
        for host in hosts[1:]:
            engine = await stack.enter_async_context(MLXEngine(model_dir, model_id=MODEL))

            async def handler(stream: NetStream, engine: MLXEngine = engine) -> None:
                await serve_infer(stream, engine)

            host.set_stream_handler(PROTOCOL_ID, handler)
        for dht in dhts[1:]:
            stored = await dht.provide(provider_key(f"dbloom:model:{MODEL}"))
            console.print(f"{dht.host.peer_id.short()} announces {MODEL!r} (stored at {stored})")

        client = await stack.enter_async_context(open_host(KeyPair.generate()))
        client_dht = KademliaDHT(
            client, KadConfig(mode="client", bootstrap=(hosts[0].listen_addrs[0],))
        )
        await nursery.start(client_dht.run)
        start = trio.current_time()
        providers = await client_dht.find_providers_list(provider_key(f"dbloom:model:{MODEL}"))
        console.print(
            f"client found {len(providers)} provider(s) in "
            f"{(trio.current_time() - start) * 1000:.1f} ms through the DHT"
        )
        chosen = providers[0].peer_id
        info = await identify(client, chosen)
        rtt = (await ping(client, chosen, count=3))[-1]
        console.print(
            f"connected to {chosen.short()} ({info.agent_version}) over TCP + Noise XX + yamux, "
            f"ping {rtt * 1e6:.0f} µs"
        )
        await _ask(client, chosen)
        nursery.cancel_scope.cancel()


async def _ask(client: Host, node: PeerId) -> None:
    request = GenerateRequest(model=MODEL, prompt=PROMPT, max_tokens=48, temperature=0.0)
    console.print(f"[bold]prompt[/bold] {PROMPT}")
    console.print("[bold]answer[/bold] ", end="")
    start = trio.current_time()
    first: float | None = None
    stream = await client.new_stream(node, [PROTOCOL_ID])
    async with aclosing(infer(stream, request)) as items:
        async for item in items:
            if isinstance(item, Final):
                final = item
                break
            first = first or trio.current_time()
            console.print(item.text, end="", markup=False, highlight=False)
    end = trio.current_time()
    console.print()
    ttft = (first or end) - start
    rate = (final.completion_tokens - 1) / max(end - (first or end), 1e-9)
    console.print(
        f"{final.completion_tokens} tokens, finish {final.finish_reason.value}; "
        f"time to first token {ttft * 1000:.0f} ms, {rate:.0f} tok/s"
    )
    console.print(
        "[green]done[/green]: found through the DHT, served over an encrypted channel; "
        "nobody in between saw the prompt or the answer"
    )
