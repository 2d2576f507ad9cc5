"""Apple evidence on a Mac, collected through the signed helper app `dbloom-attest-helper`.

App Attest and Secure Enclave keychain keys answer only a signed app holding the right
entitlements, never a Python process, so the node runs the helper as a subprocess and
treats it like any other untrusted input: bounded time, bounded output, strict JSON.
The command-line contract, and how the helper is built and signed, are in
docs/apple-helper.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from ._appattest import KEY_ID_SIZE
from ._appattest import KIND as APP_ATTEST_KIND
from ._errors import AttestationError
from ._evidence import Claims, Evidence, claims_digest
from ._mda import KIND as MDA_KIND
from ._mda import mda_nonce

HELPER = "dbloom-attest-helper"
CONTRACT_VERSION = 1
DEFAULT_TIMEOUT = 30.0
MAX_STDOUT = 64 << 10
MAX_STDERR = 4 << 10
MAX_DETAIL = 300
EXIT_MEANINGS = {
    2: "usage error",
    3: "not supported on this Mac",
    4: "Apple's attestation service failed",
    5: "unknown or invalidated key",
}


@dataclass(slots=True)
class _Capture:
    cap: int
    data: bytearray = field(default_factory=bytearray)
    overflowed: bool = False

    async def drain(self, stream: trio.abc.ReceiveStream, scope: trio.CancelScope | None) -> None:
        while chunk := await stream.receive_some(MAX_STDOUT):
            room = self.cap - len(self.data)
            self.data += chunk[: max(room, 0)]
            if len(chunk) > room and not self.overflowed:
                self.overflowed = True
                if scope is not None:
                    scope.cancel()


class AppleHelperProvider:
    """Evidence of kind `apple-app-attest` or `apple-mda`, produced by the helper app."""

    def __init__(self, kind: str, helper: str = HELPER, timeout: float = DEFAULT_TIMEOUT) -> None:
        if kind not in (APP_ATTEST_KIND, MDA_KIND):
            raise ValueError(f"the Apple helper makes {APP_ATTEST_KIND} or {MDA_KIND}, not {kind}")
        self.kind = kind
        self.helper = helper
        self.timeout = timeout
        self.key_id: bytes | None = None

    async def evidence(self, claims: Claims) -> Evidence:
        """Fresh evidence for `claims`: a new attested key, or an MDA-key signature."""
        if self.kind == MDA_KIND:
            return await self._mda(claims)
        return await self.attest(claims)

    async def attest(self, claims: Claims) -> Evidence:
        """A new App Attest key, attested by Apple with the claims digest as client data."""
        claims_bytes = claims.encode()
        body = await self._call(
            ["app-attest", "--client-data-hash", claims_digest(claims_bytes).hex()],
            {"key_id", "attestation"},
        )
        key_id = _key_id(body)
        self.key_id = key_id
        proof = {"attestation": _b64(body["attestation"], "attestation"), "key_id": key_id}
        return Evidence(APP_ATTEST_KIND, claims_bytes, proof)

    async def assertion(self, claims: Claims, key_id: bytes | None = None) -> Evidence:
        """An assertion by an already attested key (the last one by default)."""
        key_id = key_id if key_id is not None else self.key_id
        if key_id is None:
            raise AttestationError("no App Attest key to assert with; attest first")
        claims_bytes = claims.encode()
        client_data_hash = hashlib.sha256(claims_digest(claims_bytes)).hexdigest()
        body = await self._call(
            [
                "app-attest",
                "--client-data-hash",
                client_data_hash,
                "--key-id",
                base64.b64encode(key_id).decode(),
            ],
            {"key_id", "assertion"},
        )
        if _key_id(body) != key_id:
            raise AttestationError(f"{self.helper} asserted with another key than asked")
        proof = {"assertion": _b64(body["assertion"], "assertion"), "key_id": key_id}
        return Evidence(APP_ATTEST_KIND, claims_bytes, proof)

    async def _mda(self, claims: Claims) -> Evidence:
        claims_bytes = claims.encode()
        body = await self._call(
            ["mda", "--digest", claims_digest(claims_bytes).hex()], {"chain", "sig"}
        )
        chain = body["chain"]
        if not isinstance(chain, list) or len(chain) != 2:
            raise AttestationError(
                f"{self.helper} printed a chain that is not [leaf, intermediate]"
            )
        proof = {
            "chain": [_b64(item, "chain item") for item in chain],
            "mda_nonce": mda_nonce(claims.peer_id),
            "sig": _b64(body["sig"], "sig"),
        }
        return Evidence(MDA_KIND, claims_bytes, proof)

    async def _call(self, args: Sequence[str], keys: set[str]) -> dict[str, Any]:
        path = shutil.which(self.helper)
        if path is None:
            raise AttestationError(
                f"{self.helper} not found; on a Mac install the signed helper app "
                "(docs/apple-helper.md), elsewhere use another evidence kind"
            )
        code, out, err = await _run([path, *args], self.timeout, self.helper)
        if code != 0:
            meaning = EXIT_MEANINGS.get(code, "unexpected failure")
            raise AttestationError(f"{self.helper} failed ({meaning}, exit {code}): {_detail(err)}")
        return _parse(out, self.kind, keys, self.helper)


async def _run(argv: list[str], timeout: float, name: str) -> tuple[int, bytes, bytes]:
    try:
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except OSError as e:
        raise AttestationError(f"cannot run {name}: {e}") from None
    assert proc.stdout is not None and proc.stderr is not None
    out, err = _Capture(MAX_STDOUT), _Capture(MAX_STDERR)
    try:
        with trio.move_on_after(timeout) as deadline:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(out.drain, proc.stdout, nursery.cancel_scope)
                nursery.start_soon(err.drain, proc.stderr, None)
            if not out.overflowed:
                await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            code = await proc.wait()
            await proc.stdout.aclose()
            await proc.stderr.aclose()
    if deadline.cancelled_caught:
        raise AttestationError(f"{name} did not answer within {timeout:g} s")
    if out.overflowed:
        raise AttestationError(f"{name} printed more than {MAX_STDOUT} bytes")
    return code, bytes(out.data), bytes(err.data)


def _detail(stderr: bytes) -> str:
    text = stderr.decode("utf-8", "replace").strip()
    line = text.splitlines()[0] if text else "no error message"
    return "".join(c if c.isprintable() else "?" for c in line)[:MAX_DETAIL]


def _parse(raw: bytes, kind: str, keys: set[str], name: str) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise AttestationError(f"{name} printed something that is not JSON: {e}") from None
    expected = {"v", "kind", *keys}
    if not isinstance(body, dict) or set(body) != expected:
        raise AttestationError(f"{name} must print an object of {', '.join(sorted(expected))}")
    if type(body["v"]) is not int or body["v"] != CONTRACT_VERSION:
        raise AttestationError(f"{name} speaks contract {body['v']!r}, not {CONTRACT_VERSION}")
    if body["kind"] != kind:
        raise AttestationError(f"{name} answered {body['kind']!r} evidence, not {kind}")
    return body


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise AttestationError(f"helper field {what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as e:
        raise AttestationError(f"helper field {what} is not base64: {e}") from None


def _key_id(body: dict[str, Any]) -> bytes:
    key_id = _b64(body["key_id"], "key_id")
    if len(key_id) != KEY_ID_SIZE:
        raise AttestationError(f"helper key_id is {len(key_id)} bytes, not {KEY_ID_SIZE}")
    return key_id
