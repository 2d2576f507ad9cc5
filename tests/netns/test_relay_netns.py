"""Macs behind home NATs, reached through relays that see only ciphertext.

Topology, all in network namespaces these tests make and remove (private addresses only):

    relay   10.77.1.2 ─┐
    relay2  10.77.1.5 ─┤
    client  10.77.1.3 ─┼─ br0 (the "public" segment)
    router  10.77.1.4 ─┤   router: MASQUERADE out, nothing forwarded in
   (router2 10.77.1.6)─┘
    router  10.77.2.1 ─── node 10.77.2.2 (a home network)
   (router2 10.77.3.1 ─── client 10.77.3.2, when the client is at home too)

Relays run `dbloom relay`, the real command. The node reserves a slot on a relay; the
client dials the node's /p2p-circuit address and echoes a payload full of a random
marker, while tcpdump records every packet on the relay's interface: the marker must
arrive intact and never appear in the capture. Then: reachability (dial-backs fail
through the NAT, two relays come from the DHT), and hole punching (DCUtR) between two
NATed peers.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import queue
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from netns_roles import payload

IP = shutil.which("ip") or "/usr/sbin/ip"
IPTABLES = shutil.which("iptables") or "/usr/sbin/iptables"
TCPDUMP = shutil.which("tcpdump") or "/usr/bin/tcpdump"
ROLES = Path(__file__).with_name("netns_roles.py")
RELAY = "import typer; from dbloom.cli.relay import relay; typer.run(relay)"
STEP_TIMEOUT = 10.0


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=STEP_TIMEOUT)


class Proc:
    """A process in a namespace whose output lines are collected as they come."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
        self.args = args
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: dict[str, queue.Queue[str | None]] = {
            "out": queue.Queue(),
            "err": queue.Queue(),
        }
        self.seen: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(pipe, self.lines[name]), daemon=True)
            for name, pipe in (("out", self.popen.stdout), ("err", self.popen.stderr))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(pipe: IO[str] | None, lines: queue.Queue[str | None]) -> None:
        assert pipe is not None
        for line in pipe:
            lines.put(line)
        lines.put(None)

    def read_line(self, prefix: str, *, stderr: bool = False) -> str:
        """The rest of the next line starting with `prefix`, within STEP_TIMEOUT."""
        lines = self.lines["err" if stderr else "out"]
        deadline = time.monotonic() + STEP_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        self.stop()
        errors = self.drain(stderr=True)[-20:]
        raise AssertionError(f"no {prefix!r} line from {self.args}; output {self.seen}; {errors}")

    def drain(self, *, stderr: bool = False) -> list[str]:
        """Every line not read yet, once the process has ended (after `stop`)."""
        lines = self.lines["err" if stderr else "out"]
        out = []
        while (line := lines.get(timeout=STEP_TIMEOUT)) is not None:
            out.append(line.strip())
        return out

    def wait(self) -> int:
        return self.popen.wait(timeout=STEP_TIMEOUT)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=3)
        for reader in self._readers:
            reader.join(timeout=3)


@dataclass
class Lab:
    """Namespaces and processes of one test; `close` removes every one of them."""

    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[str] = field(default_factory=list)
    processes: list[Proc] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"dbl-{role}-{self.suffix}"

    def add_ns(self, role: str) -> str:
        name = self.ns(role)
        _run(IP, "netns", "add", name)
        self.namespaces.append(name)
        _run(IP, "-n", name, "link", "set", "lo", "up")
        return name

    def link(self, a: str, a_if: str, b: str, b_if: str) -> None:
        _run(IP, "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b)

    def sh(self, ns: str, *args: str) -> None:
        _run(IP, "netns", "exec", ns, *args)

    def start(self, ns: str, *args: str) -> Proc:
        proc = Proc([IP, "netns", "exec", ns, *args])
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.processes:
            proc.stop()
        for name in reversed(self.namespaces):
            subprocess.run([IP, "netns", "del", name], capture_output=True, timeout=STEP_TIMEOUT)


@dataclass(frozen=True)
class Topology:
    relay: str
    relay2: str
    client: str
    node: str


def build_topology(lab: Lab, *, home_client: bool = False, symmetric: bool = False) -> Topology:
    """The picture at the top; `home_client` puts the client behind a NAT of its own
    (10.77.1.6 outside, 10.77.3.2 inside) and makes both routers drop unsolicited
    inbound packets, as home routers do, rather than refuse them. `symmetric` makes both
    NATs pick a fresh random port for every new connection (endpoint-dependent mapping),
    which defeats hole punching."""
    pub = lab.ns("pub")
    net = Topology(*(lab.add_ns(role) for role in ("relay", "relay2", "client", "node")))
    lab.sh(pub, IP, "link", "add", "br0", "type", "bridge")
    lab.sh(pub, IP, "link", "set", "br0", "up")
    public = [(net.relay, "10.77.1.2"), (net.relay2, "10.77.1.5")]
    if not home_client:
        public.append((net.client, "10.77.1.3"))
    for i, (ns, addr) in enumerate(public):
        lab.link(pub, f"p{i}", ns, "eth0")
        lab.sh(pub, IP, "link", "set", f"p{i}", "master", "br0", "up")
        lab.sh(ns, IP, "addr", "add", f"{addr}/24", "dev", "eth0")
        lab.sh(ns, IP, "link", "set", "eth0", "up")
    home_network(
        lab,
        "router",
        net.node,
        wan="10.77.1.4",
        lan="10.77.2",
        drop=home_client,
        symmetric=symmetric,
    )
    if home_client:
        home_network(
            lab,
            "router2",
            net.client,
            wan="10.77.1.6",
            lan="10.77.3",
            drop=True,
            symmetric=symmetric,
        )
    return net


def home_network(
    lab: Lab, role: str, inside: str, *, wan: str, lan: str, drop: bool, symmetric: bool = False
) -> None:
    """A router namespace on the public bridge that masquerades for `inside` at `lan`.2."""
    pub, router = lab.ns("pub"), lab.add_ns(role)
    lab.link(pub, f"p-{role}", router, "wan")
    lab.sh(pub, IP, "link", "set", f"p-{role}", "master", "br0", "up")
    lab.link(router, "lan", inside, "eth0")
    lab.sh(router, IP, "addr", "add", f"{wan}/24", "dev", "wan")
    lab.sh(router, IP, "addr", "add", f"{lan}.1/24", "dev", "lan")
    lab.sh(router, IP, "link", "set", "wan", "up")
    lab.sh(router, IP, "link", "set", "lan", "up")
    lab.sh(router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    masquerade = ("-j", "MASQUERADE", *(("--random-fully",) if symmetric else ()))
    lab.sh(router, IPTABLES, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", *masquerade)
    lab.sh(router, IPTABLES, "-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT")
    established = ("-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
    lab.sh(router, IPTABLES, "-A", "FORWARD", "-i", "wan", "-o", "lan", *established)
    lab.sh(router, IPTABLES, "-P", "FORWARD", "DROP")
    if drop:
        lab.sh(router, IPTABLES, "-A", "INPUT", "-i", "wan", *established)
        lab.sh(router, IPTABLES, "-A", "INPUT", "-i", "wan", "-j", "DROP")
    lab.sh(inside, IP, "addr", "add", f"{lan}.2/24", "dev", "eth0")
    lab.sh(inside, IP, "link", "set", "eth0", "up")
    lab.sh(inside, IP, "route", "add", "default", "via", f"{lan}.1")


def start_relay(lab: Lab, ns: str, ip: str, home: Path, *options: str) -> str:
    """`dbloom relay` in `ns`; its address."""
    relay = lab.start(
        ns,
        *(sys.executable, "-c", RELAY, "--listen", f"/ip4/{ip}/tcp/4001"),
        *("--home", str(home), "--circuit-seconds", "30", *options),
    )
    addr = relay.read_line("listening on ")
    assert addr.startswith(f"/ip4/{ip}/tcp/4001/p2p/")
    return addr


def echo_through(lab: Lab, client_ns: str, node: Proc, circuit: str) -> str:
    """The client echoes a marked payload to the node through `circuit`; both saw all of it.

    Returns the marker (random, so it cannot be on the wire by chance).
    """
    marker = secrets.token_hex(32)
    client = lab.start(client_ns, sys.executable, str(ROLES), "client", circuit, marker)
    echoed = client.read_line("echoed ")
    assert client.wait() == 0
    assert echoed == node.read_line("received ") == hashlib.sha256(payload(marker)).hexdigest()
    return marker


def test_natted_node_reached_through_a_blind_relay(lab: Lab, tmp_path: Path) -> None:
    net = build_topology(lab)
    relay_addr = start_relay(lab, net.relay, "10.77.1.2", tmp_path / "relay")

    capture = tmp_path / "relay.pcap"
    tcpdump = lab.start(
        net.relay, TCPDUMP, "-i", "eth0", "-U", "-s", "0", "-B", "16384", "-w", str(capture)
    )
    tcpdump.read_line("tcpdump: listening on", stderr=True)

    node = lab.start(net.node, sys.executable, str(ROLES), "node", relay_addr)
    circuit = node.read_line("reachable at ")
    assert circuit.startswith(f"{relay_addr}/p2p-circuit/p2p/12D3KooW")
    marker = echo_through(lab, net.client, node, circuit)

    body = payload(marker)
    settle(capture, 4 * len(body))  # the body passes here four times: in, out, echoed in, out
    tcpdump.stop(signal.SIGINT)
    assert "0 packets dropped by kernel" in tcpdump.drain(stderr=True)
    wire = capture.read_bytes()
    # the capture saw the relay's traffic: the cleartext multistream header of each
    # connection, and the payload's size each way through the relay
    assert b"/noise" in wire
    assert len(wire) > 4 * len(body)
    plain = marker.encode()
    leaks = [plain[i : i + 16] for i in range(len(plain) - 15) if plain[i : i + 16] in wire]
    assert not leaks, "plaintext seen on the relay's wire"
    assert b"please summarise" not in wire
    # the relay knows the node only by its router's public address
    hosts = ipv4_hosts(wire)
    assert {"10.77.1.2", "10.77.1.3", "10.77.1.4"} <= hosts and "10.77.2.2" not in hosts


def settle(capture: Path, at_least: int) -> None:
    """Wait until tcpdump has written every packet: `at_least` bytes, then no growth.

    tcpdump drains the kernel's buffer on its own schedule, and what is still buffered
    when it is stopped is lost without counting as dropped.
    """
    size, deadline = -1, time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline and (size < at_least or capture.stat().st_size != size):
        size = capture.stat().st_size
        time.sleep(0.5)


def ipv4_hosts(pcap: bytes) -> set[str]:
    """Source and destination addresses of the IPv4-over-Ethernet packets in a pcap file."""
    hosts = set()
    pos = 24  # the global header
    while pos + 16 <= len(pcap):
        (length,) = struct.unpack_from("<I", pcap, pos + 8)
        frame = pcap[pos + 16 : pos + 16 + length]
        pos += 16 + length
        if len(frame) >= 34 and frame[12:14] == b"\x08\x00":
            hosts.add(str(ipaddress.IPv4Address(frame[26:30])))
            hosts.add(str(ipaddress.IPv4Address(frame[30:34])))
    return hosts


def test_natted_node_finds_two_relays_and_is_reached(lab: Lab, tmp_path: Path) -> None:
    """Reachability: dial-backs fail through the NAT, relays come from the DHT."""
    net = build_topology(lab)
    relay1 = start_relay(lab, net.relay, "10.77.1.2", tmp_path / "relay1")
    relay2 = start_relay(lab, net.relay2, "10.77.1.5", tmp_path / "relay2", "--bootstrap", relay1)
    roles = (sys.executable, str(ROLES), "autorelay")
    node = lab.start(net.node, *roles, "/ip4/0.0.0.0/tcp/4001", relay1)
    public = lab.start(net.client, *roles, "/ip4/10.77.1.3/tcp/4001", relay1)
    assert node.read_line("reachability ") == "private"
    circuits = [node.read_line("reachable at ") for _ in range(2)]
    assert {c.split("/p2p-circuit/")[0] for c in circuits} == {relay1, relay2}
    assert public.read_line("reachability ") == "public"
    for circuit in circuits:
        echo_through(lab, net.client, node, circuit)


def test_node_is_not_directly_reachable(lab: Lab) -> None:
    net = build_topology(lab)
    listener = lab.start(net.node, sys.executable, "-c", _LISTEN)
    listener.read_line("ready")
    probe = subprocess.run(
        [IP, "netns", "exec", net.client, sys.executable, "-c", _CONNECT],
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
    )
    assert probe.stdout.strip() == "unreachable", probe


_LISTEN = """
import socket
s = socket.create_server(("0.0.0.0", 4001))
print("ready", flush=True)
s.accept()
"""
_CONNECT = """
import socket
try:
    socket.create_connection(("10.77.2.2", 4001), timeout=2).close()
    print("reachable")
except OSError:
    print("unreachable")
"""


def test_hole_punch_replaces_the_relay(lab: Lab, tmp_path: Path) -> None:
    """DCUtR: both peers behind NATs that drop unsolicited packets end up connected directly."""
    net = build_topology(lab, home_client=True)
    relay = start_relay(lab, net.relay, "10.77.1.2", tmp_path / "relay")
    node = lab.start(net.node, sys.executable, str(ROLES), "punch-node", relay)
    circuit = node.read_line("reachable at ")
    marker = secrets.token_hex(32)
    client = lab.start(net.client, sys.executable, str(ROLES), "punch-client", circuit, marker)
    # the node's router, at the node's own listening port: the hole its NAT opened
    assert client.read_line("direct ") == "/ip4/10.77.1.4/tcp/4001"
    echoed = client.read_line("echoed ")
    assert echoed == node.read_line("received ") == hashlib.sha256(payload(marker)).hexdigest()


def test_hole_punch_falls_back_to_the_relay_through_symmetric_nats(
    lab: Lab, tmp_path: Path
) -> None:
    """Where both NATs map every connection to a fresh port, punching cannot work: the
    peers stay on the relayed connection, which still carries the whole exchange."""
    net = build_topology(lab, home_client=True, symmetric=True)
    relay = start_relay(lab, net.relay, "10.77.1.2", tmp_path / "relay")
    node = lab.start(net.node, sys.executable, str(ROLES), "punch-node", relay)
    circuit = node.read_line("reachable at ")
    marker = secrets.token_hex(32)
    client = lab.start(net.client, sys.executable, str(ROLES), "fallback-client", circuit, marker)
    assert "p2p-circuit" in client.read_line("relayed ")
    echoed = client.read_line("echoed ")
    assert echoed == node.read_line("received ") == hashlib.sha256(payload(marker)).hexdigest()
