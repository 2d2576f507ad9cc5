"""Inference benchmark: local mlx-lm vs our engine over TCP vs `mlx_lm.server`.

Builds the generated `small` model (about 25M parameters, random weights) unless `--model`
names a folder, then measures, all greedy:

  (a) `mlx_lm.stream_generate` in-process, one stream: decode tok/s and TTFT;
  (b) the same request through `/dbloom/infer` on our host (loopback TCP + Noise + yamux);
  (c) 8 concurrent streams through our engine and host versus `mlx_lm.server` (started
      here on 127.0.0.1) with 8 concurrent HTTP clients on `/v1/completions`: aggregate
      tok/s (all completion tokens over the wall time) and mean TTFT.

This process is the node (engine and host), as a peer is; the clients of (b) and (c), for
both servers, run in a child process, as they run on another machine in the network: a
client reading in the node's own process takes the GIL from the engine's worker at every
token. For reference (b) is measured once more with the client in the node's process.
On Linux with 2+ CPUs the serving side (this process, so (a) and our node, and
`mlx_lm.server`) is pinned to the first CPU and the client process to the others
(`--no-pin` lets the OS choose): a client's work then never lands on the serving core,
for either server, as on separate machines.

Each figure is the median of `--repeats` single-stream runs or `--batch-repeats`
concurrent runs. The two sides run in back-to-back pairs and each ratio is the median of
the per-pair ratios, so drifting background load on a shared machine mostly cancels.
Targets: (b)/(a) >= 0.98, (c) ours/server >= 1.0.

    .venv/bin/python bench/inference.py [--model DIR] [--tokens 128] [--streams 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from cpus import set_cpus
from rich.console import Console
from rich.table import Table

from dbloom.inference import (
    PROTOCOL_ID,
    Final,
    GenerateRequest,
    MLXEngine,
    build_tiny_model,
    infer,
    serve_infer,
)
from dbloom.p2p import Host, KeyPair, Multiaddr, NetStream, open_host

MODEL_ID = "bench-small"
PROMPT = "The quick brown fox jumps over the lazy dog near the quiet river bank, and then"
SERVER_START_TIMEOUT = 120.0
REQUEST_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class Run:
    """One measured stream: tokens, time to first token, decode time after it."""

    tokens: int
    ttft: float
    decode_seconds: float

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Batch:
    """Concurrent streams: total tokens over wall time, and their mean TTFT."""

    tokens: int
    wall_seconds: float
    mean_ttft: float

    @property
    def aggregate_tps(self) -> float:
        return self.tokens / self.wall_seconds


def stream_prompt(i: int) -> str:
    return f"Stream {i}: {PROMPT}"


def local_run(model: Any, tokenizer: Any, tokens: int) -> Run:
    """(a) In-process `stream_generate`."""
    from mlx_lm import stream_generate

    start = time.perf_counter()
    first = last = start
    count = 0
    for response in stream_generate(model, tokenizer, PROMPT, max_tokens=tokens):
        last = time.perf_counter()
        if count == 0:
            first = last
        if response.finish_reason == "stop" and response.token in tokenizer.eos_token_ids:
            break
        count += 1
    return Run(count, first - start, last - first)


async def our_stream(node: tuple[Host, Multiaddr], prompt: str, tokens: int) -> tuple[Run, float]:
    """One request on its own stream through our host (TCP + Noise + yamux, connection
    kept); returns the run and its finish time."""
    client, address = node
    request = GenerateRequest(model=MODEL_ID, prompt=prompt, max_tokens=tokens, temperature=0.0)
    start = time.perf_counter()
    first = last = start
    count = 0
    stream = await client.new_stream(address, [PROTOCOL_ID])
    async with aclosing(infer(stream, request)) as items:
        async for item in items:
            if isinstance(item, Final):
                break
            last = time.perf_counter()
            if count == 0:
                first = last
            count += len(item.token_ids)
    return Run(count, first - start, last - first), last


async def server_stream(port: int, prompt: str, tokens: int) -> tuple[Run, float]:
    """One streaming `/v1/completions` request to `mlx_lm.server`."""
    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    start = time.perf_counter()
    first = last = start
    seen_text = False
    usage = 0
    buffer = b""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head + body)
        while data := await stream.receive_some(65536):
            buffer += data
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                line = event.strip().split(b"\r\n")[-1]
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                if payload.get("usage"):
                    usage = payload["usage"]["completion_tokens"]
                if payload.get("choices") and payload["choices"][0].get("text"):
                    last = time.perf_counter()
                    if not seen_text:
                        first, seen_text = last, True
    return Run(usage, first - start, last - first), last


async def concurrent(
    one: Callable[[Any, str, int], Any], target: Any, streams: int, tokens: int, salt: int
) -> Batch:
    """Start `streams` requests at once; wall time runs to the last token."""
    runs: list[tuple[Run, float]] = []

    async def go(i: int) -> None:
        runs.append(await one(target, f"{salt}.{stream_prompt(i)}", tokens))

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(streams):
            nursery.start_soon(go, i)
    end = max(finish for _, finish in runs)
    return Batch(
        tokens=sum(r.tokens for r, _ in runs),
        wall_seconds=end - start,
        mean_ttft=statistics.mean(r.ttft for r, _ in runs),
    )


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ClientProcess:
    """The child process that runs every client: one JSON command per line in, one JSON
    result per line out."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self._stdin = process.stdin
        self._lines = _lines(process.stdout)

    async def ask(self, **command: Any) -> dict[str, Any]:
        await self._stdin.send_all(json.dumps(command).encode() + b"\n")
        line = await self._lines.__anext__()
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the client process failed: {answer['error']}")
        return answer

    async def run(self, target: str, tokens: int) -> Run:
        return Run(**await self.ask(kind="run", target=target, tokens=tokens))

    async def batch(self, target: str, streams: int, tokens: int, salt: int) -> Batch:
        answer = await self.ask(
            kind="batch", target=target, streams=streams, tokens=tokens, salt=salt
        )
        return Batch(**answer)


async def _lines(stream: trio.abc.ReceiveStream) -> Any:
    buffer = b""
    while True:
        while b"\n" not in buffer:
            data = await stream.receive_some(65536)
            if not data:
                raise RuntimeError("the client process exited")
            buffer += data
        line, buffer = buffer.split(b"\n", 1)
        yield line


async def client_worker(node_address: str, server_port: int) -> None:
    """The `--client` child: holds one connection to the node and answers commands."""
    async with open_host(KeyPair.generate()) as client:
        ours = (client, Multiaddr.parse(node_address))
        stdin = trio.lowlevel.FdStream(os.dup(0))
        stdout = trio.lowlevel.FdStream(os.dup(1))
        async for line in _lines(stdin):
            command = json.loads(line)
            one: Callable[[Any, str, int], Any] = our_stream
            target: Any = ours
            if command["target"] == "server":
                one, target = server_stream, server_port
            try:
                if command["kind"] == "run":
                    run, _ = await one(target, PROMPT, command["tokens"])
                    answer: dict[str, Any] = dataclasses.asdict(run)
                else:
                    batch = await concurrent(
                        one, target, command["streams"], command["tokens"], command["salt"]
                    )
                    answer = dataclasses.asdict(batch)
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            await stdout.send_all(json.dumps(answer).encode() + b"\n")


def median_run(runs: list[Run]) -> Run:
    return Run(
        tokens=int(statistics.median(r.tokens for r in runs)),
        ttft=statistics.median(r.ttft for r in runs),
        decode_seconds=statistics.median(r.decode_seconds for r in runs),
    )


def median_batch(batches: list[Batch]) -> Batch:
    return Batch(
        tokens=int(statistics.median(b.tokens for b in batches)),
        wall_seconds=statistics.median(b.wall_seconds for b in batches),
        mean_ttft=statistics.median(b.mean_ttft for b in batches),
    )


def serving_and_client_cpus() -> tuple[set[int], set[int]] | None:
    """(serving CPUs, client CPUs), or None where pinning is not possible."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


async def bench(
    model_dir: Path,
    tokens: int,
    streams: int,
    repeats: int,
    batch_repeats: int,
    pin: tuple[set[int], set[int]] | None,
) -> dict[str, Any]:
    from mlx_lm import load

    if pin is not None:
        set_cpus(os.getpid(), pin[0])  # mlx_lm.server inherits it

    loaded = load(str(model_dir))
    model, tokenizer = loaded[0], loaded[1]
    results: dict[str, Any] = {}
    async with (
        MLXEngine(model_dir, model_id=MODEL_ID, max_batch=streams) as engine,
        open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"]) as node,
        open_host(KeyPair.generate()) as client,
        trio.open_nursery() as nursery,
    ):

        async def handler(stream: NetStream) -> None:
            await serve_infer(stream, engine)

        node.set_stream_handler(PROTOCOL_ID, handler)
        in_process = (client, node.listen_addrs[0])
        server_port = free_port()
        command = [
            sys.executable,
            "-m",
            "mlx_lm.server",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(server_port),
            "--log-level",
            "WARNING",
        ]
        server = await nursery.start(
            partial(trio.run_process, command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        worker = await nursery.start(
            partial(
                trio.run_process,
                [sys.executable, __file__, "--client", str(node.listen_addrs[0]), str(server_port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        )
        if pin is not None:
            set_cpus(worker.pid, pin[1])
        clients = ClientProcess(worker)
        await wait_for_port(server_port, SERVER_START_TIMEOUT)

        with trio.fail_after(REQUEST_TIMEOUT):
            local_run(model, tokenizer, 8)
            await our_stream(in_process, PROMPT, 8)
            for target in ("ours", "server"):
                await clients.run(target, 8)
                await clients.batch(target, streams, 8, -1)

            local: list[Run] = []
            tcp: list[Run] = []
            same: list[Run] = []
            for _ in range(repeats):
                local.append(await trio.to_thread.run_sync(local_run, model, tokenizer, tokens))
                tcp.append(await clients.run("ours", tokens))
                same.append((await our_stream(in_process, PROMPT, tokens))[0])
            results["a"] = median_run(local)
            results["b"] = median_run(tcp)
            results["b/a"] = statistics.median(
                b.decode_tps / a.decode_tps for a, b in zip(local, tcp, strict=True)
            )
            results["b_same"] = median_run(same)
            results["b_same/a"] = statistics.median(
                b.decode_tps / a.decode_tps for a, b in zip(local, same, strict=True)
            )

            engine_batches: list[Batch] = []
            server_batches: list[Batch] = []
            for r in range(batch_repeats):
                server_batches.append(await clients.batch("server", streams, tokens, r))
                engine_batches.append(await clients.batch("ours", streams, tokens, r))
            results["c_ours"] = median_batch(engine_batches)
            results["c_server"] = median_batch(server_batches)
            results["c"] = statistics.median(
                o.aggregate_tps / v.aggregate_tps
                for o, v in zip(engine_batches, server_batches, strict=True)
            )
        worker.terminate()
        server.terminate()
        nursery.cancel_scope.cancel()
    return results


def report(results: dict[str, Any], tokens: int, streams: int, console: Console) -> None:
    a: Run = results["a"]
    b: Run = results["b"]
    ours: Batch = results["c_ours"]
    server: Batch = results["c_server"]
    table = Table(title=f"small model, greedy, {tokens} tokens per stream (medians)")
    for column in ("case", "streams", "tokens", "tok/s", "TTFT ms", "vs baseline"):
        table.add_column(column, justify="left" if column == "case" else "right")
    table.add_row(
        "(a) local stream_generate",
        "1",
        str(a.tokens),
        f"{a.decode_tps:.1f}",
        f"{a.ttft * 1e3:.1f}",
        "baseline",
    )
    table.add_row(
        "(b) engine via /dbloom/infer on our host",
        "1",
        str(b.tokens),
        f"{b.decode_tps:.1f}",
        f"{b.ttft * 1e3:.1f}",
        f"{results['b/a']:.3f}x (a)",
    )
    same: Run = results["b_same"]
    table.add_row(
        "  (b) again, client in the node's process",
        "1",
        str(same.tokens),
        f"{same.decode_tps:.1f}",
        f"{same.ttft * 1e3:.1f}",
        f"{results['b_same/a']:.3f}x (a)",
    )
    table.add_row(
        "(c) mlx_lm.server, HTTP",
        str(streams),
        str(server.tokens),
        f"{server.aggregate_tps:.1f}",
        f"{server.mean_ttft * 1e3:.1f}",
        "baseline",
    )
    table.add_row(
        "(c) engine via /dbloom/infer on our host",
        str(streams),
        str(ours.tokens),
        f"{ours.aggregate_tps:.1f}",
        f"{ours.mean_ttft * 1e3:.1f}",
        f"{results['c']:.3f}x server",
    )
    console.print(table)
    console.print(
        "decode tok/s for single streams (tokens after the first over the time after it); "
        "aggregate tok/s for concurrent streams (all tokens over wall time, TTFT included)."
    )
    console.print(
        "ratios are medians of per-pair ratios (each pair runs back to back), "
        "which cancels most drift in background load."
    )
    console.print(
        "clients of (b) and (c) run in a child process (a node's clients are elsewhere); "
        "the reference row puts the client in the node's process, where it shares the GIL."
    )
    console.print(
        f"targets: (b)/(a) = {results['b/a']:.3f} (>= 0.98), "
        f"(c) ours/server = {results['c']:.3f} (>= 1.0)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="model folder (default: build `small`)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams in (c)")
    parser.add_argument("--repeats", type=int, default=7, help="single-stream pairs (median)")
    parser.add_argument("--batch-repeats", type=int, default=3, help="concurrent pairs (median)")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serving side on the first CPU, clients on the others (Linux, 2+ CPUs)",
    )
    parser.add_argument("--client", nargs=2, metavar=("NODE", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        trio.run(client_worker, args.client[0], int(args.client[1]))
        return
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_tiny_model(Path(tmp) / "small", size="small")
        pin = serving_and_client_cpus() if args.pin else None
        results = trio.run(
            bench, model_dir, args.tokens, args.streams, args.repeats, args.batch_repeats, pin
        )
    report(results, args.tokens, args.streams, console)
    if pin is None:
        console.print("placement: not pinned (the OS places every process)")
    else:
        console.print(
            f"placement: this process ((a), our node) and mlx_lm.server on CPU "
            f"{sorted(pin[0])}, the client process on CPU {sorted(pin[1])}"
        )


if __name__ == "__main__":
    main()
