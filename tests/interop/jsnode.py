"""Start and stop the js-libp2p peer (``peer.mjs``) from trio code.

``js_listener`` runs ``node peer.mjs listen`` for the life of an ``async with`` block;
``js_dial`` runs ``node peer.mjs dial`` to completion and returns its JSON events.
``js_kad_server`` / ``js_kad`` do the same for ``node peer.mjs kad`` (a Kademlia DHT
server / a one-shot DHT client). Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import math
import shutil
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

INTEROP_DIR = Path(__file__).resolve().parent
PEER_JS = INTEROP_DIR / "peer.mjs"
DEFAULT_ECHO_PROTOCOL = "/dbloom/echo/1.0.0"
DEFAULT_KAD_PROTOCOL = "/dbloom/kad/1.0.0"
NPM_CI_TIMEOUT = 300.0
STDERR_TAIL_LINES = 40

Event = dict[str, Any]


class JsPeerError(RuntimeError):
    """The js peer failed; carries the events it printed and the tail of its stderr."""

    def __init__(self, message: str, events: list[Event], stderr_tail: str) -> None:
        super().__init__(f"{message}\n--- peer.mjs stderr (tail) ---\n{stderr_tail}")
        self.events = events
        self.stderr_tail = stderr_tail


def _which(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise RuntimeError(f"`{tool}` not found on PATH (the js interop tests need Node.js + npm)")
    return path


def _tail(data: bytes | str, lines: int = STDERR_TAIL_LINES) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return "\n".join(text.splitlines()[-lines:])


async def ensure_node_modules(timeout: float = NPM_CI_TIMEOUT) -> None:
    """Run ``npm ci`` in tests/interop if node_modules is missing or older than the lockfile.

    Test workers running side by side (pytest-xdist) take turns through a lock file, so
    only the first installs and the others find node_modules fresh.
    Raises RuntimeError (with the reason) if node/npm are missing or the install fails.
    """
    _which("node")
    npm = _which("npm")
    with trio.fail_after(2 * timeout):  # another worker's install may take `timeout`
        lock = await trio.to_thread.run_sync(_take_install_lock, abandon_on_cancel=True)
    with lock:
        if _node_modules_fresh():
            return
        try:
            with trio.fail_after(timeout):
                result = await trio.run_process(
                    [npm, "ci", "--no-audit", "--no-fund"],
                    cwd=INTEROP_DIR,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
        except trio.TooSlowError:
            raise RuntimeError(
                f"`npm ci` in {INTEROP_DIR} took longer than {timeout:.0f} s"
            ) from None
    if result.returncode != 0:
        raise RuntimeError(
            f"`npm ci` in {INTEROP_DIR} failed (exit {result.returncode}):\n"
            + _tail(result.stderr + result.stdout)
        )


def _node_modules_fresh() -> bool:
    # npm writes node_modules/.package-lock.json on every install: a good freshness stamp.
    lock = INTEROP_DIR / "package-lock.json"
    stamp = INTEROP_DIR / "node_modules" / ".package-lock.json"
    return stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime


def _take_install_lock() -> IO[str]:
    """An open lock file, held until it is closed."""
    handle = (INTEROP_DIR / ".npm-install.lock").open("a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


@dataclass
class JsListener:
    """A running ``peer.mjs listen`` process."""

    peer_id: str
    addrs: list[str]
    process: trio.Process
    _events: trio.MemoryReceiveChannel[Event]
    _stderr: deque[str]
    _backlog: list[Event] = field(default_factory=list)

    @property
    def addr(self) -> str:
        """The first listen multiaddr, ending in /p2p/<peer id>."""
        return self.addrs[0]

    def stderr_tail(self) -> str:
        """The last lines the process wrote to stderr."""
        return "\n".join(self._stderr)

    async def next_event(self, kind: str, timeout: float = 10.0) -> Event:
        """Return the earliest not-yet-returned event whose ``event`` field equals ``kind``.

        Events of other kinds are kept for later calls. Raises trio.TooSlowError on timeout
        and JsPeerError if the process exits first.
        """
        for i, ev in enumerate(self._backlog):
            if ev.get("event") == kind:
                return self._backlog.pop(i)
        with trio.fail_after(timeout):
            while True:
                try:
                    ev = await self._events.receive()
                except trio.EndOfChannel:
                    errors = [e.get("message") for e in self._backlog if e.get("event") == "error"]
                    raise JsPeerError(
                        f"js peer exited before a {kind!r} event"
                        + (f": {errors[0]}" if errors else ""),
                        self._backlog,
                        self.stderr_tail(),
                    ) from None
                if ev.get("event") == kind:
                    return ev
                self._backlog.append(ev)


async def _read_lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buf = b""
    async for chunk in stream:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.decode(errors="replace")
    if buf:
        yield buf.decode(errors="replace")


async def _pump_stdout(
    stream: trio.abc.ReceiveStream, send: trio.MemorySendChannel[Event], stderr: deque[str]
) -> None:
    async with send:
        async for line in _read_lines(stream):
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                stderr.append(f"[non-JSON stdout] {line}")
                continue
            await send.send(ev)


async def _pump_stderr(stream: trio.abc.ReceiveStream, stderr: deque[str]) -> None:
    async for line in _read_lines(stream):
        stderr.append(line)


@asynccontextmanager
async def js_listener(
    echo_protocol: str = DEFAULT_ECHO_PROTOCOL,
    extra_args: Sequence[str] = (),
    startup_timeout: float = 20.0,
) -> AsyncIterator[JsListener]:
    """Run ``node peer.mjs listen`` and yield a JsListener once it prints its addresses.

    ``extra_args`` are passed through (e.g. ``["--identify-push"]``). The process is asked
    to stop (stdin closed) on exit and killed if it does not within a few seconds.
    """
    args = ["listen", "--echo-protocol", echo_protocol, *extra_args]
    async with _long_running(args, startup_timeout) as listener:
        yield listener


PutItems = Mapping[str, bytes] | Iterable[tuple[str, bytes]]


def provider_key(name: str) -> bytes:
    """The DHT provider key for NAME: the sha2-256 multihash of its UTF-8 bytes.

    js-libp2p looks providers up by ``CIDv1(raw, that multihash)`` and sends the bare
    multihash as the GET_PROVIDERS / ADD_PROVIDER key.
    """
    return bytes([0x12, 0x20]) + hashlib.sha256(name.encode()).digest()


def provider_cid(name: str) -> str:
    """``CIDv1(raw 0x55, provider_key(name))`` as base32 text, as peer.mjs reports it."""
    cid = bytes([0x01, 0x55]) + provider_key(name)
    return "b" + base64.b32encode(cid).decode().lower().rstrip("=")


def kad_args(
    bootstrap: Sequence[str] = (),
    *,
    protocol: str = DEFAULT_KAD_PROTOCOL,
    server: bool = False,
    provide: Sequence[str] = (),
    put: PutItems = (),
    find_providers: Sequence[str] = (),
    get: Sequence[str] = (),
) -> list[str]:
    """The ``peer.mjs kad …`` argument list (without ``node peer.mjs``)."""
    args = ["kad", "--protocol", protocol]
    if server:
        args.append("--server")
    for addr in bootstrap:
        args += ["--bootstrap", addr]
    for name in provide:
        args += ["--provide", name]
    items = put.items() if isinstance(put, Mapping) else put
    for key, value in items:
        args += ["--put", f"{key}={bytes(value).hex()}"]
    for name in find_providers:
        args += ["--find-providers", name]
    for key in get:
        args += ["--get", key]
    return args


@asynccontextmanager
async def js_kad_server(
    bootstrap: Sequence[str] = (),
    *,
    protocol: str = DEFAULT_KAD_PROTOCOL,
    provide: Sequence[str] = (),
    put: PutItems = (),
    find_providers: Sequence[str] = (),
    get: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    startup_timeout: float = 20.0,
    ready_timeout: float = 60.0,
) -> AsyncIterator[JsListener]:
    """Run ``node peer.mjs kad --server`` (a js DHT server) for the life of the block.

    Yields once the node has bootstrapped and done its ``provide``/``put``/``find_providers``/
    ``get`` steps (its ``ready`` event); their events stay readable via ``next_event``
    (``bootstrapped``, ``provided``, ``put``, ``providers``, ``value``), as do
    ``routing_table_add``, ``connection`` and ``identify`` events that come later.
    """
    args = kad_args(
        bootstrap,
        protocol=protocol,
        server=True,
        provide=provide,
        put=put,
        find_providers=find_providers,
        get=get,
    )
    async with _long_running([*args, *extra_args], startup_timeout) as server:
        try:
            await server.next_event("ready", timeout=ready_timeout)
        except trio.TooSlowError:
            raise JsPeerError(
                f"js DHT server was not ready within {ready_timeout:.0f} s",
                server._backlog,
                server.stderr_tail(),
            ) from None
        yield server


@asynccontextmanager
async def _long_running(args: Sequence[str], startup_timeout: float) -> AsyncIterator[JsListener]:
    """Run ``node peer.mjs ARGS…`` and yield a JsListener once it prints ``listening``."""
    await ensure_node_modules()
    node = _which("node")
    cmd = [node, str(PEER_JS), *args]
    stderr: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    send, recv = trio.open_memory_channel[Event](math.inf)
    proc = await trio.lowlevel.open_process(
        cmd,
        cwd=INTEROP_DIR,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
    # Exceptions from the with-body are re-raised after the nursery closes, so callers see
    # them as they are rather than wrapped in an ExceptionGroup.
    body_exc: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pump_stdout, proc.stdout, send, stderr)
            nursery.start_soon(_pump_stderr, proc.stderr, stderr)
            listener = JsListener("", [], proc, recv, stderr)
            try:
                await _wait_listening(listener, startup_timeout)
                yield listener
            except BaseException as exc:
                body_exc = exc
            finally:
                with trio.CancelScope(shield=True):
                    await _stop(proc)
                nursery.cancel_scope.cancel()
        if body_exc is not None:
            raise body_exc
    finally:
        with trio.CancelScope(shield=True):
            await _stop(proc)


async def _wait_listening(listener: JsListener, limit: float) -> None:
    try:
        ready = await listener.next_event("listening", timeout=limit)
    except trio.TooSlowError:
        raise JsPeerError(
            f"js listener printed no 'listening' line within {limit:.0f} s",
            listener._backlog,
            listener.stderr_tail(),
        ) from None
    listener.peer_id = ready["peer_id"]
    listener.addrs = list(ready["addrs"])


async def _stop(proc: trio.Process, grace: float = 5.0) -> None:
    """Close stdin (peer.mjs then stops cleanly); kill if it is still alive after ``grace``."""
    if proc.returncode is not None:
        return
    if proc.stdin is not None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await proc.stdin.aclose()
    with trio.move_on_after(grace):
        await proc.wait()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def js_dial(
    multiaddr: str,
    echo_protocol: str = DEFAULT_ECHO_PROTOCOL,
    payload_size: int = 1000,
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
) -> list[Event]:
    """Run ``node peer.mjs dial`` against ``multiaddr`` and return its parsed events.

    The dialer pings 3 times, runs identify, echoes ``payload_size`` random bytes and prints
    ``done``. Raises JsPeerError (with the stderr tail) on a non-zero exit or timeout.
    """
    args = [
        "dial", multiaddr,
        "--echo-protocol", echo_protocol,
        "--payload-size", str(payload_size),
        *extra_args,
    ]  # fmt: skip
    return await _run_to_completion(args, timeout, "js dialer")


async def js_kad(
    bootstrap: Sequence[str],
    *,
    protocol: str = DEFAULT_KAD_PROTOCOL,
    find_providers: Sequence[str] = (),
    get: Sequence[str] = (),
    provide: Sequence[str] = (),
    put: PutItems = (),
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
) -> list[Event]:
    """Run a one-shot js DHT client (``node peer.mjs kad``) and return its parsed events.

    It dials every ``bootstrap`` multiaddr, waits for its routing table, then provides,
    puts, finds providers and gets, in that order, printing one event per item (see
    README.md). ``put`` maps record keys to value bytes. Raises JsPeerError on a non-zero
    exit or timeout; a ``get`` that finds nothing is an ``error`` field, not a failure.
    """
    args = kad_args(
        bootstrap,
        protocol=protocol,
        provide=provide,
        put=put,
        find_providers=find_providers,
        get=get,
    )
    return await _run_to_completion([*args, *extra_args], timeout, "js DHT client")


async def _run_to_completion(args: Sequence[str], timeout: float, what: str) -> list[Event]:
    await ensure_node_modules()
    node = _which("node")
    try:
        with trio.fail_after(timeout):
            result = await trio.run_process(
                [node, str(PEER_JS), *args],
                cwd=INTEROP_DIR,
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    except trio.TooSlowError:
        raise JsPeerError(f"{what} did not finish within {timeout:.0f} s", [], "") from None
    events = _parse_events(result.stdout)
    stderr_tail = _tail(result.stderr)
    if result.returncode != 0:
        errors = [e.get("message") for e in events if e.get("event") == "error"]
        raise JsPeerError(
            f"{what} exited {result.returncode}: {errors[0] if errors else 'no error event'}",
            events,
            stderr_tail,
        )
    return events


def _parse_events(stdout: bytes) -> list[Event]:
    events: list[Event] = []
    for line in stdout.decode(errors="replace").splitlines():
        if line.strip():
            with suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


def node_available() -> bool:
    """True if both node and npm are on PATH (for pytest skip conditions)."""
    return shutil.which("node") is not None and shutil.which("npm") is not None


__all__ = [
    "DEFAULT_ECHO_PROTOCOL",
    "DEFAULT_KAD_PROTOCOL",
    "INTEROP_DIR",
    "JsListener",
    "JsPeerError",
    "ensure_node_modules",
    "js_dial",
    "js_kad",
    "js_kad_server",
    "js_listener",
    "kad_args",
    "node_available",
    "provider_cid",
    "provider_key",
]
