"""Multiaddrs: self-describing network addresses, text and binary.

Our own small codec rather than the `multiaddr` package: we need a dozen
protocols, strict typed errors for hostile bytes from identify and Kademlia, and
no dependency tree (that package pulls in netaddr, py-cid, psutil and more).
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Final

from ._errors import DecodeError
from ._identity import PeerId
from ._wire import decode_uvarint, encode_uvarint

MAX_MULTIADDR_BYTES: Final = 1024
MAX_DNS_NAME: Final = 253


@dataclass(frozen=True, slots=True)
class _Proto:
    name: str
    code: int
    size: int  # bits of a fixed-size value, 0 for none, -1 for varint-length-prefixed


_PROTOCOLS: Final = (
    _Proto("ip4", 4, 32),
    _Proto("tcp", 6, 16),
    _Proto("udp", 273, 16),
    _Proto("dns", 53, -1),
    _Proto("dns4", 54, -1),
    _Proto("dns6", 55, -1),
    _Proto("dnsaddr", 56, -1),
    _Proto("ip6", 41, 128),
    _Proto("p2p", 421, -1),
    _Proto("p2p-circuit", 290, 0),
    _Proto("quic-v1", 0x01CC, 0),
    _Proto("tls", 448, 0),
    _Proto("ws", 477, 0),
    _Proto("wss", 478, 0),
    _Proto("memory", 777, 64),
)
_BY_NAME: Final = {p.name: p for p in _PROTOCOLS} | {"ipfs": _PROTOCOLS[8]}
_BY_CODE: Final = {p.code: p for p in _PROTOCOLS}


class MultiaddrError(DecodeError):
    """A multiaddr that does not parse; the message says which part and why."""


def _check_value(proto: _Proto, value: str) -> str:
    """Validate and canonicalise a text value."""
    try:
        if proto.name == "ip4":
            return str(ipaddress.IPv4Address(value))
        if proto.name == "ip6":
            if "%" in value:
                raise ValueError("zone ids are not supported")
            return str(ipaddress.IPv6Address(value))
        if proto.name in ("tcp", "udp"):
            if not value.isdigit() or int(value) > 65535:
                raise ValueError("port must be 0-65535")
            return str(int(value))
        if proto.name == "memory":
            if not value.isdigit() or int(value) >= 1 << 64:
                raise ValueError("memory address must be a 64-bit unsigned integer")
            return str(int(value))
        if proto.name == "p2p":
            return PeerId.from_string(value).to_base58()
        if proto.size == -1:
            if not value or len(value.encode()) > MAX_DNS_NAME or "/" in value:
                raise ValueError("name must be 1-253 bytes")
            return value
    except (ValueError, DecodeError) as exc:
        raise MultiaddrError(f"invalid /{proto.name} value {value!r}: {exc}") from None
    raise MultiaddrError(f"/{proto.name} takes no value")


@dataclass(frozen=True, slots=True)
class Multiaddr:
    """An immutable sequence of (protocol, value) parts, e.g. /ip4/1.2.3.4/tcp/80."""

    parts: tuple[tuple[str, str | None], ...]

    @classmethod
    def parse(cls, text: str) -> Multiaddr:
        """Parse the text form; raises MultiaddrError with the offending part."""
        if not isinstance(text, str) or not text.startswith("/"):
            raise MultiaddrError(f"multiaddr must start with '/': {text!r}")
        if len(text) > 4 * MAX_MULTIADDR_BYTES:
            raise MultiaddrError("multiaddr too long")
        tokens = text.rstrip("/").split("/")[1:]
        parts: list[tuple[str, str | None]] = []
        i = 0
        while i < len(tokens):
            name = tokens[i]
            proto = _BY_NAME.get(name)
            if proto is None:
                raise MultiaddrError(f"unknown protocol /{name} in {text!r}")
            if proto.size == 0:
                parts.append((proto.name, None))
                i += 1
                continue
            if i + 1 >= len(tokens) or tokens[i + 1] == "":
                raise MultiaddrError(f"/{proto.name} needs a value in {text!r}")
            parts.append((proto.name, _check_value(proto, tokens[i + 1])))
            i += 2
        if not parts:
            raise MultiaddrError("empty multiaddr")
        return cls(tuple(parts))

    @classmethod
    def from_bytes(cls, raw: bytes) -> Multiaddr:
        """Decode the binary form from untrusted bytes; repeats come from a cache."""
        return _multiaddr_from_bytes(bytes(raw))

    @classmethod
    def _decode(cls, raw: bytes) -> Multiaddr:
        if len(raw) > MAX_MULTIADDR_BYTES:
            raise MultiaddrError("multiaddr too long")
        parts: list[tuple[str, str | None]] = []
        pos = 0
        while pos < len(raw):
            code = decode_uvarint(raw, pos)
            if code is None:
                raise MultiaddrError("truncated multiaddr protocol code")
            proto = _BY_CODE.get(code[0])
            if proto is None:
                raise MultiaddrError(f"unknown multiaddr protocol code {code[0]}")
            pos = code[1]
            if proto.size == 0:
                parts.append((proto.name, None))
                continue
            if proto.size > 0:
                size = proto.size // 8
            else:
                length = decode_uvarint(raw, pos)
                if length is None:
                    raise MultiaddrError("truncated multiaddr value length")
                size, pos = length
            value = raw[pos : pos + size]
            if len(value) != size:
                raise MultiaddrError(f"truncated /{proto.name} value")
            pos += size
            parts.append((proto.name, _value_from_bytes(proto, value)))
        if not parts:
            raise MultiaddrError("empty multiaddr")
        return cls(tuple(parts))

    def to_bytes(self) -> bytes:
        """The binary form (identify and Kademlia carry it)."""
        return _multiaddr_to_bytes(self)

    def _encode(self) -> bytes:
        out = bytearray()
        for name, value in self.parts:
            proto = _BY_NAME[name]
            out += encode_uvarint(proto.code)
            if value is None:
                continue
            if name == "ip4":
                out += ipaddress.IPv4Address(value).packed
            elif name == "ip6":
                out += ipaddress.IPv6Address(value).packed
            elif name in ("tcp", "udp"):
                out += int(value).to_bytes(2, "big")
            elif name == "memory":
                out += int(value).to_bytes(8, "big")
            else:
                raw = PeerId.from_string(value).multihash if name == "p2p" else value.encode()
                out += encode_uvarint(len(raw)) + raw
        return bytes(out)

    def __str__(self) -> str:
        return "".join(f"/{n}" if v is None else f"/{n}/{v}" for n, v in self.parts)

    def __repr__(self) -> str:
        return f"Multiaddr({self})"

    def value_for(self, name: str) -> str | None:
        """The value of the first part named `name`, or None."""
        for part, value in self.parts:
            if part == name:
                return value
        return None

    @property
    def peer_id(self) -> PeerId | None:
        """The peer id in a trailing /p2p part, if any."""
        if self.parts[-1][0] == "p2p":
            value = self.parts[-1][1]
            assert value is not None
            return PeerId.from_string(value)
        return None

    def with_peer_id(self, peer_id: PeerId) -> Multiaddr:
        """This address ending in /p2p/<peer_id> (replacing any that was there)."""
        return Multiaddr((*self.without_peer_id().parts, ("p2p", peer_id.to_base58())))

    def without_peer_id(self) -> Multiaddr:
        """This address without its trailing /p2p part."""
        if self.parts[-1][0] == "p2p" and len(self.parts) > 1:
            return Multiaddr(self.parts[:-1])
        return self

    def protocols(self) -> tuple[str, ...]:
        """The protocol names in order, e.g. ('ip4', 'tcp')."""
        return tuple(name for name, _ in self.parts)

    def is_loopback(self) -> bool:
        """True for 127.0.0.0/8, ::1 and in-memory addresses."""
        host = self.value_for("ip4") or self.value_for("ip6")
        if host is not None:
            return ipaddress.ip_address(host).is_loopback
        return self.value_for("memory") is not None


@functools.lru_cache(maxsize=1 << 16)
def _multiaddr_from_bytes(raw: bytes) -> Multiaddr:
    # Kademlia replies repeat the same addresses endlessly; multiaddrs are immutable.
    return Multiaddr._decode(raw)


@functools.lru_cache(maxsize=1 << 16)
def _multiaddr_to_bytes(addr: Multiaddr) -> bytes:
    return addr._encode()


def _value_from_bytes(proto: _Proto, value: bytes) -> str:
    if proto.name == "ip4":
        return str(ipaddress.IPv4Address(value))
    if proto.name == "ip6":
        return str(ipaddress.IPv6Address(value))
    if proto.name in ("tcp", "udp"):
        return str(int.from_bytes(value, "big"))
    if proto.name == "memory":
        return str(int.from_bytes(value, "big"))
    if proto.name == "p2p":
        return PeerId.from_bytes(value).to_base58()
    try:
        text = value.decode()
    except UnicodeDecodeError:
        raise MultiaddrError(f"/{proto.name} value is not UTF-8") from None
    return _check_value(proto, text)
