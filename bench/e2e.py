"""End-to-end benchmark: the whole path an app sees, from the OpenAI SDK to a peer and back.

The other benchmarks time one layer each; this one checks that the layers add up to a shim
an app developer would not notice. One run starts a loopback network of real processes (a
bootstrap DHT node, `dbloom peer`s, `dbloom shim`) and measures, beside baselines taken in
the same run:

  1. time to first token through the shim on a warm connection (node already attested,
     connection pooled) and on a cold one (a fresh shim per sample: provider lookup,
     record fetch, dial, Noise, attestation), each against an `MLXEngine` in this process;
  2. decode tok/s of one greedy stream through the shim / local;
  3. aggregate tok/s of 8 concurrent streams through the shim / `mlx_lm.server` (and,
     for reference, / the same engine in this process);
  4. 1,000 concurrent streaming clients on one shim, three peers serving the `tiny`
     model (the shim's connection handling is the subject, not decode speed): errors,
     busy refusals, p99 gap between chunks, wall time.

Where things run: each peer, the shim, the bootstrap node, `mlx_lm.server` and the
cold-shim helper (this script in a child, running fresh in-process `ShimNode`s on request)
are separate processes, so no two of them share a GIL. The local baseline is an
`MLXEngine` in this process: while it is timed nothing else runs here, so its worker
thread shares the GIL only with the task reading its chunks, as inside a peer. Sections
1-3 use one peer (one engine against one engine) and, on Linux, pin the serving engine to
one CPU and everything else to the others (`--no-pin` to let the OS choose): a peer
serves from a machine of its own, not from the app's. All clients use the official
`openai` SDK, streaming chat completions, timed to the first chunk with content. CPU
seconds per process, and CPU used by other processes (a busy neighbour spoils every
figure), are printed below the table.

    .venv/bin/python bench/e2e.py [--quick] [--samples N] [--clients N] [--size small]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import httpx2
import openai
import trio
from cpus import set_cpus
from rich.console import Console
from rich.table import Table

from dbloom.inference import (
    PROTOCOL_ID,
    ChatMessage,
    Chunk,
    GenerateRequest,
    MLXEngine,
    build_tiny_model,
    infer,
)
from dbloom.p2p import Host, KeyPair, Multiaddr, open_host

T = TypeVar("T")

PROMPT = "The quick brown fox jumps over the lazy dog near the quiet river bank, and then"
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
SIZES = ("tiny", "small")
HERE = os.path.abspath(__file__)
MAX_BATCH = 32
MAX_QUEUE = 512
TTFT_TOKENS = 4
SHORT_TOKENS = 8
START_TIMEOUT = 180.0
REQUEST_TIMEOUT = 600.0
CONNECT_TIMEOUT = 60.0
STOP_GRACE = 15.0
SETTLE = 0.05
NEIGHBOUR_LIMIT = 0.1
TARGET_WARM_MS = 5.0
TARGET_COLD_MS = 30.0
TARGET_DECODE = 0.98
TARGET_BATCH = 1.0

LISTEN_LINE = re.compile(r"listening on (/ip4/127\.0\.0\.1/tcp/\d+/p2p/(\w+))")
API_LINE = re.compile(r"OpenAI-compatible API on (http://\S+/v1)")
WORKER_URL = re.compile(r"^url (http://\S+/v1)$")

err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 132)


def progress(message: str) -> None:
    err.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}")


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


def p50(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


# ---- child processes --------------------------------------------------------------------


@dataclass(eq=False)
class Child:
    """One child process; its stdout lines go to `lines` and, with stderr, to its log."""

    name: str
    process: trio.Process
    log_path: Path
    stop_signal: int
    lines: trio.MemoryReceiveChannel[str]

    async def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first stdout line matching `pattern`; fails with the log's tail otherwise."""
        with trio.move_on_after(timeout):
            async for line in self.lines:
                if found := pattern.search(line):
                    return found
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{self.name} did not become ready:\n{tail}")

    async def send_line(self, text: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(text.encode() + b"\n")


def _open_log(path: Path) -> IO[bytes]:
    return path.open("ab", buffering=0)


class Children:
    """Starts children and stops every one of them (signal, grace period, then kill)."""

    def __init__(self, nursery: trio.Nursery, logs: Path) -> None:
        self.nursery = nursery
        self.logs = logs
        self.running: list[Child] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DBLOOM_")}
        self.env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_COLOR": "1"}
        self.env["PYTHONUNBUFFERED"] = "1"

    async def start(
        self,
        name: str,
        argv: list[str],
        *,
        stdin: bool = False,
        stop_signal: int = signal.SIGINT,
        cpus: set[int] | None = None,
    ) -> Child:
        log_path = self.logs / f"{name}.log"
        log = _open_log(log_path)
        try:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
            )
        except BaseException:
            log.close()
            raise
        if cpus:
            set_cpus(process.pid, cpus)  # before its interpreter has started other threads
        send, receive = trio.open_memory_channel[str](math.inf)
        child = Child(name, process, log_path, stop_signal, receive)
        self.running.append(child)
        self.nursery.start_soon(self._pump, process, send, log)
        return child

    @staticmethod
    async def _pump(
        process: trio.Process, send: trio.MemorySendChannel[str], log: IO[bytes]
    ) -> None:
        assert process.stdout is not None
        buffer = b""
        with log, send:
            while data := await process.stdout.receive_some(65536):
                log.write(data)
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    send.send_nowait(line.decode(errors="replace").rstrip("\r"))

    async def stop(self, child: Child) -> None:
        """Signal, wait `STOP_GRACE`, then kill; always reaps."""
        process = child.process
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(child.stop_signal)
                with trio.move_on_after(STOP_GRACE):
                    await process.wait()
                if process.returncode is None:
                    progress(f"[yellow]{child.name} ignored its stop signal; killing it[/yellow]")
                    process.kill()
                await process.wait()
            if child in self.running:
                self.running.remove(child)

    async def stop_all(self) -> None:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for child in list(reversed(self.running)):
                    nursery.start_soon(self.stop, child)


@dataclass(frozen=True)
class Placement:
    """Which CPUs serve and which run clients in sections 1-3 (none: the OS decides).

    With one core for the serving engine (peer, mlx_lm.server) and the other for the
    clients and the shim, each engine gets a core of its own, as it would on a machine
    of its own; unpinned on two cores, the shim's and the SDK's per-token work lands on
    the peer's core and slows its decode (see the report's notes). The local engine is
    measured on the serving core too (`on_serving_core`), while the peer there is idle:
    a VM's two cores can differ by a few ms per 400 ms prefill, not always the same way,
    so a baseline on the other core would charge that difference to the network path.
    """

    serve: frozenset[int] = frozenset()
    clients: frozenset[int] = frozenset()

    @staticmethod
    def choose(enabled: bool) -> Placement:
        if not enabled or not hasattr(os, "sched_setaffinity"):
            return Placement()
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return Placement()
        return Placement(frozenset(cpus[:1]), frozenset(cpus[1:]))

    @contextlib.contextmanager
    def on_serving_core(self) -> Iterator[None]:
        """This process (the local engine and its reader) on the serving core meanwhile."""
        if not self.serve:
            yield
            return
        set_cpus(os.getpid(), set(self.serve))
        try:
            yield
        finally:
            set_cpus(os.getpid(), set(self.clients))

    @property
    def everything(self) -> set[int]:
        return set(self.serve | self.clients)

    def describe(self) -> str:
        if not self.serve:
            return "no pinning (the OS places every process)"
        return (
            f"sections 1-3: peer0, mlx_lm.server and the local engine (while measured) on "
            f"CPU {sorted(self.serve)}, the bench (SDK client), shim, cold-shim helper and "
            f"bootstrap on CPU {sorted(self.clients)}; section 4 unpinned"
        )


def dbloom(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "dbloom.cli", "--home", str(home), *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_for_port(port: int, timeout: float) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.25)
                continue
            await stream.aclose()
            return


def raise_fd_limit(wanted: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards `wanted` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` so far, all threads (NaN without /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class CpuMeter:
    """CPU seconds that named processes spend over measured intervals, summed."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.totals: dict[str, float] = dict.fromkeys(pids, 0.0)
        self._start: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        for name, pid in self.pids.items():
            self.totals[name] += cpu_seconds(pid) - self._start[name]

    def per(self, units: float, scale: float = 1e3) -> str:
        return ", ".join(f"{name} {t / units * scale:.1f}" for name, t in self.totals.items())


def _machine_busy_seconds() -> float:
    """CPU seconds this machine spent busy (all cores, steal excluded); NaN without /proc."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    except (OSError, ValueError):
        return math.nan
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


class Neighbours:
    """CPU that processes outside this benchmark use while it measures: on a shared
    machine a busy neighbour moves every figure, so each section reports it."""

    def __init__(self, children: Children) -> None:
        self.children = children
        self.cores: dict[str, float] = {}
        self._start = (0.0, 0.0, 0.0)

    def _ours(self) -> float:
        t = os.times()
        running = sum(cpu_seconds(c.process.pid) for c in self.children.running)
        return t.user + t.system + t.children_user + t.children_system + running

    def start(self) -> None:
        self._start = (time.perf_counter(), _machine_busy_seconds(), self._ours())

    def stop(self, section: str) -> None:
        wall0, busy0, ours0 = self._start
        wall = time.perf_counter() - wall0
        foreign = (_machine_busy_seconds() - busy0) - (self._ours() - ours0)
        self.cores[section] = max(foreign, 0.0) / wall if wall > 0 else math.nan


# ---- the cold-shim helper (a child process) -------------------------------------------


async def cold_worker(bootstrap: str) -> None:
    """Reads commands on stdin: `new` starts a fresh `ShimNode` (new identity,
    bootstrapped, then connected to the bootstrap node only) and prints `url URL`; `stop`
    stops it and prints `stopped`. Ends at end of input.

    On a loopback network this small, joining the DHT dials every peer; a shim in a real
    network would rarely hold a connection to the node it picks, so the helper drops all
    but the bootstrap connection and the first request pays the dial and Noise handshake.
    """
    from dbloom.cli._shim import ShimNode, ShimSettings

    boot_id = bootstrap.rsplit("/p2p/", 1)[1]
    Running = tuple[trio.CancelScope, trio.Event]

    async def read_line() -> str:
        return await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)

    async def serve(
        running: list[tuple[trio.CancelScope, trio.Event]], *, task_status: Any
    ) -> None:
        done = trio.Event()
        try:
            with trio.CancelScope() as scope:
                running.append((scope, done))
                shim = ShimNode(ShimSettings(port=0, bootstrap=[bootstrap], allow_dev=True))
                await shim.run(task_status=task_status)
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        running: list[Running] = []
        while command := (await read_line()).strip():
            if command == "new":
                shim: Any = await nursery.start(serve, running)
                for peer in list(shim.host.connected_peers()):
                    if str(peer) != boot_id:
                        await shim.host.disconnect(peer)
                print(f"url {shim.base_url}", flush=True)
            elif command == "stop":
                while running:
                    scope, done = running.pop()
                    scope.cancel()
                    with trio.move_on_after(STOP_GRACE):
                        await done.wait()  # its shutdown must not overlap the next sample
                print("stopped", flush=True)
        nursery.cancel_scope.cancel()


# ---- measured requests ------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    """One stream: when it was sent, when each content chunk arrived, tokens counted."""

    sent: float
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0
    node: str = ""

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    @property
    def decode_tps(self) -> float:
        span = self.chunks[-1] - self.chunks[0]
        return (self.tokens - 1) / span if span > 0 else math.nan

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]


def client_for(base_url: str, connections: int = 16) -> openai.AsyncOpenAI:
    limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
    http = openai.DefaultAsyncHttpxClient(
        limits=limits, timeout=httpx2.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT)
    )
    return openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, http_client=http)


async def sdk_stream(
    client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int
) -> Sample:
    """One streamed chat completion through the official SDK, greedy."""
    sample = Sample(sent=time.perf_counter())
    raw = await client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    sample.node = raw.headers.get("x-dbloom-node", "")
    stream = raw.parse()
    async with stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                sample.chunks.append(time.perf_counter())
            if chunk.usage is not None:
                sample.tokens = chunk.usage.completion_tokens
    if not sample.chunks:
        raise RuntimeError("the stream carried no content")
    return sample


async def local_stream(engine: MLXEngine, model: str, prompt: str, max_tokens: int) -> Sample:
    """The same request straight into an engine in this process."""
    request = GenerateRequest(
        model=model,
        messages=(ChatMessage(role="user", content=prompt),),
        max_tokens=max_tokens,
        temperature=0.0,
    )
    sample = Sample(sent=time.perf_counter())
    async with engine.generate(request) as generation:
        async for item in generation:
            if not isinstance(item, Chunk):
                break
            if item.text:
                sample.chunks.append(time.perf_counter())
            sample.tokens += len(item.token_ids)
    return sample


async def direct_stream(
    host: Host, address: Multiaddr, model: str, prompt: str, max_tokens: int
) -> Sample:
    """The same request on `/dbloom/infer` straight to the peer: no shim, no HTTP (the host
    keeps the connection, so this is the warm transport path)."""
    request = GenerateRequest(
        model=model,
        messages=(ChatMessage(role="user", content=prompt),),
        max_tokens=max_tokens,
        temperature=0.0,
    )
    sample = Sample(sent=time.perf_counter())
    stream = await host.new_stream(address, [PROTOCOL_ID])
    async with aclosing(infer(stream, request)) as items:
        async for item in items:
            if not isinstance(item, Chunk):
                break
            if item.text:
                sample.chunks.append(time.perf_counter())
            sample.tokens += len(item.token_ids)
    return sample


async def concurrent(one: Callable[[int], Awaitable[Sample]], n: int) -> tuple[float, int]:
    """Start `n` streams at once: (wall seconds to the last chunk, total tokens)."""
    samples: list[Sample] = []

    async def go(i: int) -> None:
        samples.append(await one(i))

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(go, i)
    return max(s.chunks[-1] for s in samples) - start, sum(s.tokens for s in samples)


# ---- the run ----------------------------------------------------------------------------


@dataclass
class Options:
    size: str
    load_size: str
    samples: int
    tokens: int
    streams: int
    decode_pairs: int
    batch_pairs: int
    clients: int
    logs: Path | None
    placement: Placement


@dataclass
class Network:
    """The processes of one run and what the bench learnt from them."""

    children: Children
    work: Path
    placement: Placement
    bootstrap: str = ""
    peers: dict[str, Child] = field(default_factory=dict)
    peer_addrs: dict[str, Multiaddr] = field(default_factory=dict)
    shim: Child | None = None
    shim_url: str = ""

    async def start_peer(self, index: int, model_dir: Path, cpus: set[int] | None = None) -> Child:
        child = await self.children.start(
            f"peer{index}",
            dbloom(
                self.work / f"peer{index}",
                "peer",
                "--listen",
                LOOPBACK,
                "--bootstrap",
                self.bootstrap,
                "--model",
                str(model_dir),
                "--max-batch",
                str(MAX_BATCH),
                "--max-queue",
                str(MAX_QUEUE),
                "--drain-timeout",
                "2",
            ),
            cpus=cpus,
        )
        found = await child.wait_for(LISTEN_LINE, START_TIMEOUT)
        self.peers[found.group(2)] = child
        self.peer_addrs[found.group(2)] = Multiaddr.parse(found.group(1))
        progress(f"peer{index} up (pid {child.process.pid}, {found.group(2)[-8:]})")
        return child

    async def stop_peers(self) -> None:
        for child in self.peers.values():
            await self.children.stop(child)
        self.peers.clear()
        self.peer_addrs.clear()

    @property
    def shim_pid(self) -> int:
        assert self.shim is not None
        return self.shim.process.pid


async def warm_shim(
    client: openai.AsyncOpenAI, model: str, nodes: set[str], *, burst: int, rounds: int
) -> set[str]:
    """Bursts of concurrent 1-token requests until the shim has served from every node in
    `nodes` (so each is attested and pooled) or `rounds` bursts have succeeded; returns
    the nodes seen. (The router picks the better of two random candidates, so with three
    nodes the worst-ranked one may only ever be a fail-over: it need not be seen.)"""
    seen: set[str] = set()
    done = 0
    with trio.fail_after(START_TIMEOUT):
        while done < rounds and not nodes <= seen:
            try:
                calls = [lambda: sdk_stream(client, model, PROMPT, 1) for _ in range(burst)]
                seen.update(s.node for s in await gather(calls))
                done += 1
            except (openai.APIError, RuntimeError) as e:
                progress(f"[dim]warm-up request failed ({type(e).__name__}); retrying[/dim]")
                await trio.sleep(0.5)
    return seen & nodes


async def gather(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    out: list[T] = []

    async def one(call: Callable[[], Awaitable[T]]) -> None:
        out.append(await call())

    async with trio.open_nursery() as nursery:
        for call in calls:
            nursery.start_soon(one, call)
    return out


async def section_ttft(
    net: Network, engine: MLXEngine, warm: openai.AsyncOpenAI, model: str, opts: Options
) -> dict[str, list[float]]:
    progress("section 1: time to first token (local, direct /dbloom/infer, shim warm and cold)")
    worker = await net.children.start(
        "cold-shim",
        [sys.executable, HERE, "--cold-worker", net.bootstrap],
        stdin=True,
        stop_signal=signal.SIGTERM,
    )
    out: dict[str, list[float]] = {"local": [], "direct": [], "warm": [], "cold": []}

    async def cold() -> float:
        await worker.send_line("new")
        url = (await worker.wait_for(WORKER_URL, START_TIMEOUT)).group(1)
        fresh = client_for(url)
        try:
            sample = await sdk_stream(fresh, model, PROMPT, TTFT_TOKENS)
        finally:
            await fresh.close()
            await worker.send_line("stop")
            await worker.wait_for(re.compile("^stopped$"), START_TIMEOUT)
        return sample.ttft

    async def local() -> float:
        with net.placement.on_serving_core():
            return (await local_stream(engine, model, PROMPT, TTFT_TOKENS)).ttft

    async def warm_one() -> float:
        return (await sdk_stream(warm, model, PROMPT, TTFT_TOKENS)).ttft

    (address,) = net.peer_addrs.values()
    async with open_host(KeyPair.generate()) as host:

        async def direct() -> float:
            return (await direct_stream(host, address, model, PROMPT, TTFT_TOKENS)).ttft

        await cold()  # the helper's first shim pays one-off code paths, not connection costs
        await direct()
        kinds: list[tuple[str, Callable[[], Awaitable[float]]]] = [
            ("local", local),
            ("direct", direct),
            ("warm", warm_one),
            ("cold", cold),
        ]
        with trio.fail_after(REQUEST_TIMEOUT):
            for i in range(opts.samples):
                shift = i % len(kinds)  # rotate, so that no kind always goes first
                for name, measure in kinds[shift:] + kinds[:shift]:
                    out[name].append(await measure())
                    await trio.sleep(SETTLE)
                if (i + 1) % 5 == 0 or i + 1 == opts.samples:
                    figures = ", ".join(f"{k} {p50(v) * 1e3:.1f} ms" for k, v in out.items())
                    progress(f"  {i + 1}/{opts.samples}: p50 {figures}")
    await net.children.stop(worker)
    return out


async def section_decode(
    net: Network, engine: MLXEngine, warm: openai.AsyncOpenAI, model: str, opts: Options
) -> dict[str, Any]:
    progress(f"section 2: decode tok/s, {opts.tokens} tokens, {opts.decode_pairs} pairs")
    (peer,) = net.peers.values()
    me = os.getpid()
    shim_cpu = CpuMeter({"bench (SDK)": me, "shim": net.shim_pid, "peer": peer.process.pid})
    local_cpu = CpuMeter({"bench (engine)": me})
    local: list[Sample] = []
    shim: list[Sample] = []

    async def run_local() -> None:
        with net.placement.on_serving_core():
            local_cpu.start()
            local.append(await local_stream(engine, model, PROMPT, opts.tokens))
            local_cpu.stop()

    async def run_shim() -> None:
        shim_cpu.start()
        shim.append(await sdk_stream(warm, model, PROMPT, opts.tokens))
        shim_cpu.stop()

    with trio.fail_after(REQUEST_TIMEOUT):
        for i in range(opts.decode_pairs):
            for run in (run_local, run_shim) if i % 2 == 0 else (run_shim, run_local):
                await run()
                await trio.sleep(SETTLE)
            progress(
                f"  pair {i + 1}: local {local[-1].decode_tps:.1f} tok/s ({local[-1].tokens} tok), "
                f"shim {shim[-1].decode_tps:.1f} tok/s ({shim[-1].tokens} tok)"
            )
    return {
        "local": p50([s.decode_tps for s in local]),
        "shim": p50([s.decode_tps for s in shim]),
        "tokens": int(p50([s.tokens for s in shim])),
        "ratio": p50([b.decode_tps / a.decode_tps for a, b in zip(local, shim, strict=True)]),
        "cpu_shim": shim_cpu.per(sum(s.tokens for s in shim)),
        "cpu_local": local_cpu.per(sum(s.tokens for s in local)),
    }


async def section_batch(
    net: Network,
    engine: MLXEngine,
    warm: openai.AsyncOpenAI,
    model: str,
    model_dir: Path,
    opts: Options,
) -> dict[str, Any]:
    progress(f"section 3: {opts.streams} concurrent streams: shim, mlx_lm.server, local engine")
    port = free_port()
    server = await net.children.start(
        "mlx_lm.server",
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "WARNING",
        ],
        stop_signal=signal.SIGTERM,
        cpus=set(net.placement.serve),
    )
    await wait_for_port(port, START_TIMEOUT)
    progress(f"  mlx_lm.server up (pid {server.process.pid}, port {port})")
    reference = client_for(f"http://127.0.0.1:{port}/v1", connections=opts.streams * 2)
    (peer,) = net.peers.values()
    me = os.getpid()
    meters = {
        "shim": CpuMeter({"bench (SDK)": me, "shim": net.shim_pid, "peer": peer.process.pid}),
        "server": CpuMeter({"bench (SDK)": me, "mlx_lm.server": server.process.pid}),
        "local": CpuMeter({"bench (engine)": me}),
    }

    def prompt(salt: int, i: int) -> str:
        return f"{salt}. Stream {i}: {PROMPT}"

    def side(name: str, tokens: int, salt: int) -> Callable[[int], Awaitable[Sample]]:
        if name == "shim":
            return lambda i: sdk_stream(warm, model, prompt(salt, i), tokens)
        if name == "server":
            # mlx_lm.server maps "default_model" to its --model; another name would make it
            # try to load (and download) that model.
            return lambda i: sdk_stream(reference, "default_model", prompt(salt, i), tokens)
        return lambda i: local_stream(engine, model, prompt(salt, i), tokens)

    names = ["server", "shim", "local"]
    rates: dict[str, list[float]] = {name: [] for name in names}
    tokens: dict[str, int] = dict.fromkeys(names, 0)
    try:
        with trio.fail_after(REQUEST_TIMEOUT * 2):
            for name in names:
                await concurrent(side(name, SHORT_TOKENS, -1), opts.streams)
            for r in range(opts.batch_pairs):
                for name in names[r % 3 :] + names[: r % 3]:
                    with (
                        net.placement.on_serving_core()
                        if name == "local"
                        else contextlib.nullcontext()
                    ):
                        meters[name].start()
                        wall, count = await concurrent(side(name, opts.tokens, r), opts.streams)
                        meters[name].stop()
                    rates[name].append(count / wall)
                    tokens[name] += count
                    await trio.sleep(SETTLE)
                progress(
                    f"  round {r + 1}: shim {rates['shim'][-1]:.1f} tok/s, mlx_lm.server "
                    f"{rates['server'][-1]:.1f} tok/s, local engine {rates['local'][-1]:.1f} tok/s"
                )
    finally:
        await reference.close()
        await net.children.stop(server)
    return {
        **{name: p50(rates[name]) for name in names},
        "ratio": p50([a / b for a, b in zip(rates["shim"], rates["server"], strict=True)]),
        "local_ratio": p50([a / b for a, b in zip(rates["local"], rates["server"], strict=True)]),
        "cpu": {name: meters[name].per(tokens[name]) for name in names},
    }


async def section_clients(net: Network, load_dir: Path, opts: Options) -> dict[str, Any]:
    model = load_dir.name
    progress(f"section 4: {opts.clients} concurrent streaming clients, 3 peers serving {model}")
    await net.stop_peers()
    everything = net.placement.everything
    if everything:  # the shim under load and three peers: let the OS spread them
        for pid in (os.getpid(), *(c.process.pid for c in net.children.running)):
            set_cpus(pid, everything)
    async with trio.open_nursery() as nursery:
        for index in (1, 2, 3):
            nursery.start_soon(net.start_peer, index, load_dir, everything)
    client = client_for(net.shim_url, connections=opts.clients + 16)
    pids = {"bench (SDK)": os.getpid(), "shim": net.shim_pid}
    pids |= {child.name: child.process.pid for child in net.peers.values()}
    meter = CpuMeter(pids)
    samples: list[Sample] = []
    busy = 0
    errors: dict[str, int] = {}

    async def one(i: int) -> None:
        nonlocal busy
        try:
            samples.append(await sdk_stream(client, model, f"{i}. {PROMPT}", SHORT_TOKENS))
        except openai.RateLimitError:
            busy += 1
        except Exception as e:  # every failure counts, whichever layer raised it
            kind = type(e).__name__
            if isinstance(e, openai.APIStatusError):
                kind += f" {e.status_code}"
            errors[kind] = errors.get(kind, 0) + 1

    try:
        seen = await warm_shim(client, model, set(net.peers), burst=16, rounds=4)
        progress(f"  warm-up served by {len(seen)} of the 3 peers; starting the clients")
        meter.start()
        start = time.perf_counter()
        with trio.fail_after(REQUEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for i in range(opts.clients):
                    nursery.start_soon(one, i)
        wall = time.perf_counter() - start
        meter.stop()
    finally:
        await client.close()
    nodes: dict[str, int] = {}
    for s in samples:
        nodes[s.node] = nodes.get(s.node, 0) + 1
    gaps = [g for s in samples for g in s.gaps]
    ttfts = [s.ttft for s in samples]
    progress(
        f"  done in {wall:.1f} s: {len(samples)} ok, {busy} busy, {sum(errors.values())} errors "
        f"{errors or ''}; per peer {sorted(nodes.values(), reverse=True)}"
    )
    return {
        "model": model,
        "ok": len(samples),
        "busy": busy,
        "errors": errors,
        "wall": wall,
        "gap99": pct(gaps, 0.99),
        "gap50": pct(gaps, 0.5),
        "ttft50": pct(ttfts, 0.5),
        "ttft99": pct(ttfts, 0.99),
        "nodes": sorted(nodes.values(), reverse=True),
        "cpu": meter.per(opts.clients),
    }


async def bench(opts: Options, work: Path) -> dict[str, Any]:
    logs = opts.logs or work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"logs": logs}
    async with trio.open_nursery() as nursery:
        children = Children(nursery, logs)
        try:
            nursery.start_soon(_stop_on_sigterm, nursery.cancel_scope)
            await _run(children, opts, work, results)
        finally:
            progress("stopping every process")
            await children.stop_all()
            nursery.cancel_scope.cancel()
    return results


async def _stop_on_sigterm(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            progress("[yellow]SIGTERM: stopping[/yellow]")
            scope.cancel()
            return


async def _build(work: Path, size: str) -> Path:
    progress(f"building the {size!r} model")
    return await trio.to_thread.run_sync(
        lambda: build_tiny_model(work / f"e2e-{size}", size=cast(Any, size))
    )


async def _run(children: Children, opts: Options, work: Path, results: dict[str, Any]) -> None:
    model_dir = await _build(work, opts.size)
    load_dir = model_dir if opts.load_size == opts.size else await _build(work, opts.load_size)
    model_id = model_dir.name  # `dbloom peer --model FOLDER` announces the folder's name
    net = Network(children, work, opts.placement)
    if opts.placement.clients:
        set_cpus(os.getpid(), set(opts.placement.clients))  # children inherit it
    boot = await children.start(
        "bootstrap", dbloom(work / "boot", "p2p", "serve", "--listen", LOOPBACK)
    )
    net.bootstrap = (await boot.wait_for(LISTEN_LINE, START_TIMEOUT)).group(1)
    progress(f"bootstrap up (pid {boot.process.pid})")
    await net.start_peer(0, model_dir, set(opts.placement.serve))
    net.shim = await children.start(
        "shim",
        dbloom(work / "shim", "shim", "--port", "0", "--allow-dev", "--bootstrap", net.bootstrap),
    )
    net.shim_url = (await net.shim.wait_for(API_LINE, START_TIMEOUT)).group(1)
    progress(f"shim up (pid {net.shim_pid}) on {net.shim_url}")
    pids = {c.name: c.process.pid for c in children.running} | {"bench": os.getpid()}
    results["pids"] = pids

    neighbours = Neighbours(children)
    results["neighbours"] = neighbours.cores

    async def section(name: str, measure: Awaitable[T]) -> T:
        neighbours.start()
        out = await measure
        neighbours.stop(name)
        if (cores := neighbours.cores[name]) > NEIGHBOUR_LIMIT:
            progress(
                f"[yellow]other processes used {cores:.2f} cores during section {name}[/yellow]"
            )
        return out

    async with MLXEngine(
        model_dir, model_id=model_id, max_batch=MAX_BATCH, max_queue=MAX_QUEUE
    ) as engine:
        warm = client_for(net.shim_url)
        try:
            progress("warming up (local engine and shim)")
            with trio.fail_after(START_TIMEOUT):
                for _ in range(3):
                    await local_stream(engine, model_id, PROMPT, SHORT_TOKENS)
                await warm_shim(warm, model_id, set(net.peers), burst=2, rounds=2)
                for _ in range(3):
                    await sdk_stream(warm, model_id, PROMPT, SHORT_TOKENS)
            results["ttft"] = await section("1", section_ttft(net, engine, warm, model_id, opts))
            results["decode"] = await section(
                "2", section_decode(net, engine, warm, model_id, opts)
            )
            results["batch"] = await section(
                "3", section_batch(net, engine, warm, model_id, model_dir, opts)
            )
        finally:
            await warm.close()
    results["clients"] = await section("4", section_clients(net, load_dir, opts))
    pids |= {c.name: c.process.pid for c in children.running}


# ---- the report -------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "[green]PASS[/green]" if ok else "[red]MISS[/red]"


def report(results: dict[str, Any], opts: Options, console: Console) -> None:
    ttft = results["ttft"]
    local, direct, warm, cold = (p50(ttft[k]) * 1e3 for k in ("local", "direct", "warm", "cold"))
    decode, batch, clients = results["decode"], results["batch"], results["clients"]
    n_errors = sum(clients["errors"].values())
    table = Table(
        title=f"dbloom end to end, one run: {opts.size!r} model, greedy, on 127.0.0.1",
        title_justify="left",
    )
    for column in ("#", "measure", "figure", "baseline", "result", "target", ""):
        table.add_column(column, justify="left" if column in ("#", "measure") else "right")
    rows: list[tuple[str, ...]] = [
        ("1", "TTFT p50, local MLXEngine", f"{local:.1f} ms", "", "", "", ""),
        (
            "1",
            "  (TTFT p50, direct /dbloom/infer: no shim, no HTTP)",
            f"{direct:.1f} ms",
            f"{local:.1f} ms local",
            f"{direct - local:+.1f} ms",
            "",
            "",
        ),
        (
            "1",
            "TTFT p50, shim warm (attested, pooled)",
            f"{warm:.1f} ms",
            f"{local:.1f} ms local",
            f"{warm - local:+.1f} ms",
            f"<= {TARGET_WARM_MS:.0f} ms",
            verdict(warm - local <= TARGET_WARM_MS),
        ),
        (
            "1",
            "TTFT p50, shim cold (lookup, dial, attest)",
            f"{cold:.1f} ms",
            f"{local:.1f} ms local",
            f"{cold - local:+.1f} ms",
            f"<= {TARGET_COLD_MS:.0f} ms",
            verdict(cold - local <= TARGET_COLD_MS),
        ),
        (
            "2",
            f"decode tok/s, 1 stream via shim ({decode['tokens']} tok)",
            f"{decode['shim']:.1f}",
            f"{decode['local']:.1f} local",
            f"{decode['ratio']:.3f}x",
            f">= {TARGET_DECODE}x",
            verdict(decode["ratio"] >= TARGET_DECODE),
        ),
        (
            "3",
            f"aggregate tok/s, {opts.streams} streams via shim",
            f"{batch['shim']:.1f}",
            f"{batch['server']:.1f} mlx_lm.server",
            f"{batch['ratio']:.3f}x",
            f">= {TARGET_BATCH}x",
            verdict(batch["ratio"] >= TARGET_BATCH),
        ),
        (
            "3",
            f"  (aggregate tok/s, {opts.streams} streams, local MLXEngine)",
            f"{batch['local']:.1f}",
            f"{batch['server']:.1f} mlx_lm.server",
            f"{batch['local_ratio']:.3f}x",
            "",
            "",
        ),
        (
            "4",
            f"{opts.clients} concurrent clients: errors",
            str(n_errors),
            f"{clients['ok']} ok",
            "",
            "0",
            verdict(n_errors == 0),
        ),
        ("4", "  busy refusals (429), reported apart", str(clients["busy"]), "", "", "", ""),
        (
            "4",
            "  gap between chunks p50 / p99",
            f"{clients['gap50'] * 1e3:.0f} / {clients['gap99'] * 1e3:.0f} ms",
            "",
            "",
            "",
            "",
        ),
        (
            "4",
            "  TTFT p50 / p99",
            f"{clients['ttft50'] * 1e3:.0f} / {clients['ttft99'] * 1e3:.0f} ms",
            "",
            "",
            "",
            "",
        ),
        ("4", "  wall time", f"{clients['wall']:.1f} s", "", "", "", ""),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    notes = [
        f"1: {opts.samples} samples of each kind, rotated; {TTFT_TOKENS} tokens asked; p99 "
        + ", ".join(f"{k} {pct(ttft[k], 0.99) * 1e3:.1f} ms" for k in ttft)
        + "; median of the per-round differences from local (less drift than a difference "
        "of medians): "
        + ", ".join(
            f"{k} {p50([a - b for a, b in zip(ttft[k], ttft['local'], strict=True)]) * 1e3:+.1f} ms"
            for k in ("direct", "warm", "cold")
        )
        + "; cold = a fresh ShimNode per sample (new identity, bootstrapped, then connected "
        "to the bootstrap node only).",
        f"2-3: medians of per-pair ratios, sides back to back in rotating order; decode tok/s "
        f"counts tokens after the first over the time after it; aggregate tok/s is all tokens "
        f"over the wall time to the last chunk ({opts.batch_pairs} rounds).",
        f"2: CPU ms per token, via shim: {decode['cpu_shim']}; local: {decode['cpu_local']}.",
        "3: CPU ms per token, "
        + "; ".join(f"{name}: {cpu}" for name, cpu in batch["cpu"].items())
        + ".",
        f"4: model {clients['model']!r}, {SHORT_TOKENS} tokens each; streams per peer "
        f"{clients['nodes']}; peers at --max-batch {MAX_BATCH} --max-queue {MAX_QUEUE}; "
        f"CPU ms per request: {clients['cpu']}.",
    ]
    if clients["errors"]:
        notes.append(f"4: errors by kind: {clients['errors']}")
    busy = results["neighbours"]
    notes.append(
        "CPU used by other processes on this machine, in cores, by section: "
        + ", ".join(f"{k} {v:.2f}" for k, v in busy.items())
        + (
            " [yellow](a neighbour was busy: those figures are unreliable; run again)[/yellow]"
            if any(v > NEIGHBOUR_LIMIT for v in busy.values())
            else ""
        )
    )
    notes.append(f"placement: {opts.placement.describe()}")
    pids = ", ".join(f"{k} {v}" for k, v in results["pids"].items())
    notes.append(f"processes ({os.cpu_count()} cores): {pids}")
    for note in notes:
        console.print(note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, 100 clients")
    parser.add_argument("--samples", type=int, help="TTFT samples of each kind (default 30)")
    parser.add_argument("--clients", type=int, help="concurrent clients (default 1000)")
    parser.add_argument("--size", default="small", choices=SIZES, help="model for 1-3")
    parser.add_argument("--load-size", default="tiny", choices=SIZES, help="model for 4")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per decode stream")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams in 3")
    parser.add_argument("--logs", type=Path, help="keep the children's logs in this folder")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serving engine on CPU 0, clients and shim on the others (Linux, 2+ CPUs)",
    )
    parser.add_argument("--cold-worker", metavar="BOOTSTRAP", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cold_worker:
        trio.run(cold_worker, args.cold_worker)
        return
    quick = args.quick
    opts = Options(
        size=args.size,
        load_size=args.load_size,
        samples=args.samples or (8 if quick else 30),
        tokens=args.tokens if not quick else min(args.tokens, 48),
        streams=args.streams,
        decode_pairs=2 if quick else 5,
        batch_pairs=1 if quick else 3,
        clients=args.clients or (100 if quick else 1000),
        logs=args.logs.resolve() if args.logs else None,
        placement=Placement.choose(args.pin),
    )
    soft, _ = raise_fd_limit(4 * opts.clients + 1024)
    progress(f"open files limit {soft}; {os.cpu_count()} cores; bench pid {os.getpid()}")
    console = Console(width=None if sys.stdout.isatty() else 132)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dbloom-e2e-") as tmp:
        try:
            results = trio.run(bench, opts, Path(tmp))
        except* KeyboardInterrupt:  # Ctrl-C, possibly inside a nursery's exception group
            progress("interrupted; every process was stopped")
    if "clients" not in results:
        progress("stopped before the end; every process was stopped")
        sys.exit(130 if not results else 143)
    report(results, opts, console)


if __name__ == "__main__":
    main()
