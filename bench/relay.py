"""Relay benchmark: a circuit through a relay beside a direct connection, in one run.

The relay and the node each run in their own process (as remote peers would), the
client here; all on loopback. The node both listens and holds a reservation, so the
same peer is measured directly and through the relay. Ratios compare this run only.

The node also serves a generated random-weight model (`tiny` unless `--size` or
`--model` says otherwise; nothing is downloaded) over `/dbloom/infer`, so the same run
measures inference both ways (issue #9): time to first token (`max_tokens` 1) and decode
tok/s (`--infer-tokens`), greedy, on a kept connection, direct and relayed requests
alternating. The relayed client dials only the `/p2p-circuit` address, runs no identify
and no hole punching, and is checked to hold one relayed connection and nothing else.

    python bench/relay.py [--seconds 3] [--samples 2000] [--infer-requests 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass
from pathlib import Path

import trio

from dbloom.inference import (
    PROTOCOL_ID,
    Chunk,
    Final,
    GenerateRequest,
    MLXEngine,
    build_tiny_model,
    infer,
    serve_infer,
)
from dbloom.p2p import Host, HostConfig, KeyPair, Multiaddr, NetStream, open_host
from dbloom.p2p.relay import RelayClient, RelayLimits, RelayService

ECHO = "/bench/echo/1.0.0"
SINK = "/bench/sink/1.0.0"
CHUNK = 64 * 1024
PING = b"p" * 32
LIMITS = RelayLimits(circuit_seconds=3600, circuit_bytes=1 << 40, max_circuits_per_peer=64)
MODEL_ID = "bench-relay"
PROMPT = "The quick brown fox jumps over the lazy dog near the quiet river bank, and then"
WARMUP_REQUESTS = 3


async def _echo(stream: NetStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)


async def _sink(stream: NetStream) -> None:
    total = 0
    while data := await stream.receive_some(1 << 20):
        total += len(data)
    await stream.send_all(total.to_bytes(8, "big"))


async def serve_relay() -> None:
    async with (
        open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"]) as host,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(RelayService(host, LIMITS).run)
        print(host.listen_addrs[0], flush=True)


async def serve_node(relay: str, model: str) -> None:
    """Echo, sink and (with `model`) `/dbloom/infer`, listening and through `relay`."""
    async with (
        AsyncExitStack() as stack,
        open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"]) as host,
    ):
        host.set_stream_handler(ECHO, _echo)
        host.set_stream_handler(SINK, _sink)
        if model:
            engine = await stack.enter_async_context(MLXEngine(model, model_id=MODEL_ID))

            async def _infer(stream: NetStream) -> None:
                await serve_infer(stream, engine)

            host.set_stream_handler(PROTOCOL_ID, _infer)
        async with trio.open_nursery() as nursery:
            held = await nursery.start(RelayClient(host).keep_reservation, relay)
            circuit = held.circuit_addrs[0].with_peer_id(host.peer_id)
            print(host.listen_addrs[0], circuit, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def round_trips(stream: NetStream, samples: int) -> list[float]:
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        await stream.send_all(PING)
        got = b""
        while len(got) < len(PING):
            got += await stream.receive_some(65536)
        out.append(time.perf_counter() - start)
    return out


async def throughput(stream: NetStream, seconds: float) -> float:
    chunk = b"\x5a" * CHUNK
    sent = 0
    start = time.perf_counter()
    while time.perf_counter() < start + seconds:
        for _ in range(16):
            await stream.send_all(chunk)
        sent += 16 * CHUNK
    await stream.send_eof()
    total = b""
    while len(total) < 8:
        total += await stream.receive_some(8)
    assert int.from_bytes(total, "big") == sent
    return sent / (time.perf_counter() - start) / 1e6


async def measure(addr: Multiaddr, samples: int, seconds: float) -> dict[str, float]:
    config = HostConfig(identify_on_connect=False)
    connects = []
    for _ in range(20):
        async with open_host(KeyPair.generate(), config=config) as host:
            start = time.perf_counter()
            stream = await host.new_stream(addr, [ECHO])
            await stream.send_all(b"x")
            await stream.receive_some()
            connects.append(time.perf_counter() - start)
    async with open_host(KeyPair.generate(), config=config) as host:
        stream = await host.new_stream(addr, [ECHO])
        await round_trips(stream, 200)
        rtts = await round_trips(stream, samples)
        mbps = await throughput(await host.new_stream(addr, [SINK]), seconds)
    return {
        "connect": statistics.median(connects) * 1e3,
        "rtt50": pct(rtts, 0.5) * 1e6,
        "rtt99": pct(rtts, 0.99) * 1e6,
        "mbps": mbps,
    }


@dataclass(frozen=True, slots=True)
class Sample:
    """One `/dbloom/infer` request: stream open to first token, then the rest of it."""

    tokens: int
    ttft: float
    decode_seconds: float
    relayed: bool

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0


async def infer_once(host: Host, addr: Multiaddr, tokens: int) -> Sample:
    """One greedy request on a new stream over the host's kept connection to `addr`."""
    request = GenerateRequest(model=MODEL_ID, prompt=PROMPT, max_tokens=tokens, temperature=0.0)
    start = time.perf_counter()
    first: float | None = None
    last = start
    count = 0
    stream = await host.new_stream(addr, [PROTOCOL_ID])
    async with aclosing(infer(stream, request)) as items:
        async for item in items:
            now = time.perf_counter()
            if first is None:
                first = now  # the first chunk, or the final if nothing was generated
            if isinstance(item, Final):
                break
            assert isinstance(item, Chunk)
            last = now
            count += len(item.token_ids)
    assert first is not None
    return Sample(count, first - start, max(0.0, last - first), stream.connection.relayed)


async def measure_infer(
    direct: Multiaddr, circuit: Multiaddr, requests: int, tokens: int, decodes: int
) -> tuple[dict[str, float], dict[str, float], str]:
    """TTFT and decode tok/s, direct and relayed requests alternating; and a check line."""
    config = HostConfig(identify_on_connect=False)
    async with (
        open_host(KeyPair.generate(), config=config) as near,
        open_host(KeyPair.generate(), config=config) as far,
    ):
        paths = {"direct": (near, direct), "relayed": (far, circuit)}
        for host, addr in paths.values():
            for _ in range(WARMUP_REQUESTS):
                await infer_once(host, addr, 8)
        ttfts: dict[str, list[Sample]] = {name: [] for name in paths}
        decode: dict[str, list[Sample]] = {name: [] for name in paths}
        for i in range(max(requests, decodes)):
            order = list(paths) if i % 2 == 0 else list(reversed(paths))
            for name in order:
                host, addr = paths[name]
                if i < requests:
                    ttfts[name].append(await infer_once(host, addr, 1))
                if i < decodes:
                    decode[name].append(await infer_once(host, addr, tokens))
        peer = circuit.peer_id
        assert peer is not None
        for name, (host, _) in paths.items():
            # The host prefers a direct connection, so a relayed preferred one means the
            # relayed client never got a direct connection to the node.
            want = name == "relayed"
            conn = host.connection(peer)
            seen = {s.relayed for s in ttfts[name] + decode[name]}
            if conn is None or conn.relayed != want or seen != {want}:
                raise RuntimeError(f"the {name} client's requests did not all go {name}")
        check = (
            "checked: every direct request went direct, every relayed one over the circuit\n"
            "  (no direct connection to the node); decode tokens per request (median): "
            f"direct {statistics.median(s.tokens for s in decode['direct']):.0f}, "
            f"relayed {statistics.median(s.tokens for s in decode['relayed']):.0f}"
        )
    out = {
        name: {
            "ttft50": pct([s.ttft for s in ttfts[name]], 0.5) * 1e3,
            "ttft90": pct([s.ttft for s in ttfts[name]], 0.9) * 1e3,
            "tps": statistics.median(s.decode_tps for s in decode[name]),
        }
        for name in paths
    }
    return out["relayed"], out["direct"], check


def spawn(*args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """Run this script in another mode; return it and the addresses it prints."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    while line := proc.stdout.readline():
        if line.startswith("/"):
            return proc, line.split()
    proc.wait()
    raise RuntimeError(f"{args[0]} process exited with {proc.returncode} before its address")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="client", choices=["client", "relay", "node"])
    parser.add_argument("relay", nargs="?", default="")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--model", type=Path, help="model folder (default: generate --size)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--infer-requests", type=int, default=20, help="TTFT requests per path")
    parser.add_argument("--infer-tokens", type=int, default=128, help="tokens per decode request")
    parser.add_argument("--decode-requests", type=int, default=7, help="decode requests per path")
    args = parser.parse_args()
    if args.mode == "relay":
        trio.run(serve_relay)
        return
    if args.mode == "node":
        trio.run(serve_node, args.relay, str(args.model or ""))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_model(Path(tmp) / args.size, size=args.size)
        relay_proc, (relay,) = spawn("relay")
        node_proc, (direct, circuit) = spawn("node", relay, "--model", str(model))
        try:
            plain = trio.run(measure, Multiaddr.parse(direct), args.samples, args.seconds)
            relayed = trio.run(measure, Multiaddr.parse(circuit), args.samples, args.seconds)
            infer_relayed, infer_plain, check = trio.run(
                measure_infer,
                Multiaddr.parse(direct),
                Multiaddr.parse(circuit),
                args.infer_requests,
                args.infer_tokens,
                args.decode_requests,
            )
        finally:
            for proc in (node_proc, relay_proc):
                proc.kill()
                proc.wait()
    plain |= infer_plain
    relayed |= infer_relayed
    name = args.model.name if args.model else f"generated {args.size!r}"
    rows = [
        ("connect + handshake + first stream (ms)", "connect", "{:.2f}"),
        ("32-byte echo round trip p50 (µs)", "rtt50", "{:.0f}"),
        ("32-byte echo round trip p99 (µs)", "rtt99", "{:.0f}"),
        ("one-stream throughput, 64 KiB writes (MB/s)", "mbps", "{:.0f}"),
        (f"infer TTFT p50, {args.infer_requests} requests (ms)", "ttft50", "{:.2f}"),
        (f"infer TTFT p90, {args.infer_requests} requests (ms)", "ttft90", "{:.2f}"),
        (f"infer decode tok/s, {args.infer_tokens} tokens (median)", "tps", "{:.1f}"),
    ]
    print(f"{'measure':46} {'relayed':>10} {'direct':>10} {'ratio':>8}")
    for label, key, fmt in rows:
        ratio = relayed[key] / plain[key]
        print(
            f"{label:46} {fmt.format(relayed[key]):>10} {fmt.format(plain[key]):>10} {ratio:>8.2f}"
        )
    print(f"infer: {name} model, greedy, one kept connection per path, new stream per request;")
    print("  TTFT: stream open to first chunk at max_tokens 1; decode tok/s: tokens after the")
    print(f"  first over the time after it, median of {args.decode_requests} requests per path")
    print(check)


if __name__ == "__main__":
    main()
