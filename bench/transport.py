"""Transport benchmark: dbloom (TCP + Noise + yamux) beside plain trio TCP, in one run.

Each server runs in its own process (as a remote peer would), the client here.
Prints a table; the ratios compare figures measured in this same run.

One more row shows what the round trip costs with no trio shell at all: the same Noise
and yamux cores fused into one function per direction over a raw non-blocking socket
(keys fixed, no handshake). It is the floor any shell over these cores can reach here.

    python bench/transport.py [--seconds 3] [--samples 2000]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time

import trio

from dbloom.p2p import HostConfig, KeyPair, Multiaddr, NetStream, open_host
from dbloom.p2p.noise import NoiseSession
from dbloom.p2p.yamux import DataReceived, Role, YamuxSession

ECHO = "/bench/echo/1.0.0"
SINK = "/bench/sink/1.0.0"
CHUNK = 64 * 1024
PING = b"p" * 32


# ---- servers (run as subprocesses) ----------------------------------------------------


async def _echo(stream: trio.abc.Stream) -> None:
    try:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _sink(stream: trio.abc.Stream) -> None:
    total = 0
    try:
        while data := await stream.receive_some(1 << 20):
            total += len(data)
        await stream.send_all(total.to_bytes(8, "big"))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve_dbloom() -> None:
    async def echo(stream: NetStream) -> None:
        await _echo(stream)

    async def sink(stream: NetStream) -> None:
        await _sink(stream)

    async with open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"]) as host:
        host.set_stream_handler(ECHO, echo)
        host.set_stream_handler(SINK, sink)
        print(host.listen_addrs[0], flush=True)
        await trio.sleep_forever()


async def serve_tcp() -> None:
    async def handle(stream: trio.SocketStream) -> None:
        kind = await stream.receive_some(1)
        await (_echo(stream) if kind == b"e" else _sink(stream))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(handle, listeners)


class FusedCores:
    """Noise and yamux cores over a raw socket, one call per direction, no tasks or locks."""

    def __init__(self, sock: socket.socket, role: Role) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keys = (b"\1" * 32, b"\2" * 32)
        self.sock = sock
        self.noise = NoiseSession(*(keys if role is Role.CLIENT else keys[::-1]))
        self.yamux = YamuxSession(role)

    def send(self, stream_id: int, data: bytes) -> None:
        self.yamux.send_data(stream_id, data)
        self.sock.sendall(self.noise.encrypt(self.yamux.data_to_send()))

    async def receive(self) -> list[tuple[int, bytes]]:
        while True:
            try:
                data = self.sock.recv(65536)
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
        if not data:
            return []
        self.noise.receive_data(data)
        out = []
        for event in self.yamux.receive_data(self.noise.decrypt_available()):
            if isinstance(event, DataReceived):
                self.yamux.acknowledge_received_data(event.stream_id, len(event.data))
                out.append((event.stream_id, event.data))
        if self.yamux.has_data_to_send:  # an ACK or a window update
            self.sock.sendall(self.noise.encrypt(self.yamux.data_to_send()))
        return out


async def serve_cores() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    await trio.lowlevel.wait_readable(listener)
    sock, _ = listener.accept()
    fused = FusedCores(sock, Role.SERVER)
    while received := await fused.receive():
        for stream_id, data in received:
            fused.send(stream_id, data)
        await trio.lowlevel.cancel_shielded_checkpoint()  # as a send in trio would


# ---- client measurements --------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def round_trips(stream: trio.abc.Stream, samples: int) -> list[float]:
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        await stream.send_all(PING)
        got = b""
        while len(got) < len(PING):
            got += await stream.receive_some(65536)
        out.append(time.perf_counter() - start)
    return out


async def throughput(stream: trio.abc.Stream, seconds: float, half_close: object) -> float:
    chunk = b"\x5a" * CHUNK
    sent = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(64):
            await stream.send_all(chunk)
        sent += 64 * CHUNK
    await half_close()  # type: ignore[operator]
    total = b""
    while len(total) < 8:
        total += await stream.receive_some(8)
    elapsed = time.perf_counter() - start
    assert int.from_bytes(total, "big") == sent
    return sent / elapsed / 1e6


async def bench_dbloom(addr: Multiaddr, samples: int, seconds: float) -> dict[str, float]:
    config = HostConfig(identify_on_connect=False)
    connects = []
    for _ in range(30):
        async with open_host(KeyPair.generate(), config=config) as host:
            start = time.perf_counter()
            stream = await host.new_stream(addr, [ECHO])
            await stream.send_all(b"x")
            await stream.receive_some()
            connects.append(time.perf_counter() - start)
    async with open_host(KeyPair.generate(), config=config) as host:
        conn = await host.connect(addr)
        opens = []
        for _ in range(200):
            start = time.perf_counter()
            stream = await conn.new_stream([ECHO])
            opens.append(time.perf_counter() - start)
            await stream.aclose()
        stream = await conn.new_stream([ECHO])
        await round_trips(stream, 200)
        rtts = await round_trips(stream, samples)
        sink = await conn.new_stream([SINK])
        mbps = await throughput(sink, seconds, sink.send_eof)
    return {
        "connect": statistics.median(connects) * 1e3,
        "open": statistics.median(opens) * 1e3,
        "rtt50": pct(rtts, 0.5) * 1e6,
        "rtt99": pct(rtts, 0.99) * 1e6,
        "mbps": mbps,
    }


async def bench_tcp(port: int, samples: int, seconds: float) -> dict[str, float]:
    connects = []
    for _ in range(30):
        start = time.perf_counter()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"ex")
        await stream.receive_some()
        connects.append(time.perf_counter() - start)
        await stream.aclose()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"e")
    await round_trips(stream, 200)
    rtts = await round_trips(stream, samples)
    await stream.aclose()
    sink = await trio.open_tcp_stream("127.0.0.1", port)
    await sink.send_all(b"s")
    mbps = await throughput(sink, seconds, sink.send_eof)
    return {
        "connect": statistics.median(connects) * 1e3,
        "open": float("nan"),
        "rtt50": pct(rtts, 0.5) * 1e6,
        "rtt99": pct(rtts, 0.99) * 1e6,
        "mbps": mbps,
    }


async def bench_cores(port: int, samples: int) -> float:
    """Echo round trip p50 (µs) through `FusedCores` at both ends."""
    fused = FusedCores(socket.create_connection(("127.0.0.1", port)), Role.CLIENT)
    stream_id = fused.yamux.open_stream()
    rtts = []
    for _ in range(samples + 200):
        start = time.perf_counter()
        fused.send(stream_id, PING)
        await trio.lowlevel.cancel_shielded_checkpoint()
        got = 0
        while got < len(PING):
            got += sum(len(data) for _, data in await fused.receive())
        rtts.append(time.perf_counter() - start)
    fused.sock.close()
    return pct(rtts[200:], 0.5) * 1e6


async def bench_in_process(samples: int) -> tuple[float, float]:
    """Echo round trip p50 (µs) with both ends in this process: dbloom, then plain TCP."""
    config = HostConfig(identify_on_connect=False)

    async def echo(stream: NetStream) -> None:
        await _echo(stream)

    async with (
        open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"], config=config) as server,
        open_host(KeyPair.generate(), config=config) as client,
    ):
        server.set_stream_handler(ECHO, echo)
        stream = await client.new_stream(server.listen_addrs[0], [ECHO])
        await round_trips(stream, 200)
        ours = pct(await round_trips(stream, samples), 0.5) * 1e6
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, _echo, listeners)
        tcp = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        await round_trips(tcp, 200)
        plain = pct(await round_trips(tcp, samples), 0.5) * 1e6
        nursery.cancel_scope.cancel()
    return ours, plain


def spawn(kind: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, __file__, kind], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "mode",
        nargs="?",
        default="client",
        choices=["client", "serve-dbloom", "serve-tcp", "serve-cores"],
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    if args.mode == "serve-dbloom":
        trio.run(serve_dbloom)
        return
    if args.mode == "serve-tcp":
        trio.run(serve_tcp)
        return
    if args.mode == "serve-cores":
        trio.run(serve_cores)
        return
    dbloom_proc, addr = spawn("serve-dbloom")
    tcp_proc, port = spawn("serve-tcp")
    cores_proc, cores_port = spawn("serve-cores")
    try:
        tcp = trio.run(bench_tcp, int(port), args.samples, args.seconds)
        ours = trio.run(bench_dbloom, Multiaddr.parse(addr), args.samples, args.seconds)
        ours["rtt50_cores"] = trio.run(bench_cores, int(cores_port), args.samples)
        tcp["rtt50_cores"] = tcp["rtt50"]
    finally:
        for proc in (dbloom_proc, tcp_proc, cores_proc):
            proc.kill()
            proc.wait()
    local_ours, local_tcp = trio.run(bench_in_process, args.samples)
    ours["rtt50_local"], tcp["rtt50_local"] = local_ours, local_tcp
    rows = [
        ("connect + handshake + first stream (ms)", "connect", "{:.2f}", "<= 5 ms"),
        ("stream open on a live connection (ms)", "open", "{:.3f}", ""),
        ("32-byte echo round trip p50 (µs)", "rtt50", "{:.0f}", "<= 150 µs"),
        ("32-byte echo round trip p99 (µs)", "rtt99", "{:.0f}", ""),
        ("  same cores, no trio shell (fused), p50 (µs)", "rtt50_cores", "{:.0f}", ""),
        ("  same, both ends in one process, p50 (µs)", "rtt50_local", "{:.0f}", ""),
        (
            "one-stream throughput, 64 KiB writes (MB/s)",
            "mbps",
            "{:.0f}",
            ">= 400 and >= 25% of TCP",
        ),
    ]
    print(f"{'measure':46} {'dbloom':>10} {'plain TCP':>10} {'ratio':>8}  target")
    for label, key, fmt, target in rows:
        ratio = ours[key] / tcp[key] if tcp[key] == tcp[key] else float("nan")
        tcp_text = fmt.format(tcp[key]) if tcp[key] == tcp[key] else "-"
        ratio_text = f"{ratio:.2f}" if ratio == ratio else "-"
        print(f"{label:46} {fmt.format(ours[key]):>10} {tcp_text:>10} {ratio_text:>8}  {target}")


if __name__ == "__main__":
    main()
