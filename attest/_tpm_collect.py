"""Node side of `tpm2` evidence: quote the claims digest through tpm2-tools.

We drive the tools (`tpm2_quote`, ...) rather than bind libtss2: they are packaged
everywhere, speak every TCTI (`device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`,
`tabrmd`), and keep TPM session handling out of this process. Each call has a timeout,
and every failure becomes one `AttestationError` line with the tool's own last words.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding

from ._errors import AttestationError
from ._evidence import Claims, Evidence, claims_digest
from ._tpm import (
    KIND,
    PCR_SIZE,
    TpmDecodeError,
    parse_attest,
    parse_signature,
    quoted_pcrs,
    signature_holds,
)

DEFAULT_PCRS = tuple(range(8))
DEFAULT_AK_HANDLE = 0x81000002
NUM_PCRS = 24
QUOTE_TIMEOUT = 10.0
SETUP_TIMEOUT = 60.0
SCHEMES = {"ecdsa": "ecc", "rsassa": "rsa", "rsapss": "rsa"}
STDERR_LINES = 4
STDERR_CHARS = 500


@dataclass(frozen=True, slots=True)
class AttestationKey:
    """A persisted AK: what `TpmProvider` needs, and the public key a CA certifies."""

    handle: str
    scheme: str
    public_pem: bytes


class TpmProvider:
    """Produces `tpm2` evidence for claims from one TPM and one certified AK."""

    kind = KIND

    def __init__(
        self,
        tcti: str,
        ak: str,
        chain: Sequence[Path],
        *,
        scheme: str = "ecdsa",
        pcrs: Iterable[int] = DEFAULT_PCRS,
        timeout: float = QUOTE_TIMEOUT,
    ) -> None:
        """`ak` is a persistent handle ("0x81000002"), or a context file behind a resource
        manager; `chain` is the AK certificate then its intermediates, PEM or DER, read here."""
        _check_scheme(scheme)
        self.tcti = tcti
        self.ak = ak
        self.scheme = scheme
        self.pcrs = tuple(sorted(set(pcrs)))
        if not self.pcrs or not all(0 <= i < NUM_PCRS for i in self.pcrs):
            raise AttestationError(f"PCR selection must be PCRs 0 to {NUM_PCRS - 1}")
        self.timeout = timeout
        self.chain = [c for path in chain for c in _load_certificates(path)]
        if not self.chain:
            raise AttestationError("the AK certificate chain is empty")
        try:
            self._ak_key = self.chain[0].public_key()
        except (ValueError, UnsupportedAlgorithm) as e:
            raise AttestationError(f"the AK certificate's key is unusable: {e}") from None
        # One quote at a time: a TPM without a resource manager takes one client.
        self._lock = trio.Lock()

    async def collect(self, claims: Claims) -> Evidence:
        """Quote `claims_digest(claims)` over the PCR selection, and check what came back."""
        claims_bytes = claims.encode()
        digest = claims_digest(claims_bytes)
        with tempfile.TemporaryDirectory(prefix="dbloom-tpm-") as tmp:
            out = trio.Path(tmp)
            async with self._lock:
                await _run(
                    "tpm2_quote",
                    [
                        f"--key-context={self.ak}",
                        f"--pcr-list=sha256:{','.join(map(str, self.pcrs))}",
                        f"--qualification={digest.hex()}",
                        "--hash-algorithm=sha256",
                        f"--scheme={self.scheme}",
                        f"--message={out / 'quote'}",
                        f"--signature={out / 'sig'}",
                        "--format=tss",
                        f"--pcr={out / 'pcrs'}",
                        "--pcrs_format=values",
                    ],
                    self.tcti,
                    self.timeout,
                )
            try:
                quote = await (out / "quote").read_bytes()
                sig = await (out / "sig").read_bytes()
                values = await (out / "pcrs").read_bytes()
            except OSError as e:
                raise AttestationError(f"tpm2_quote left no output: {e}") from None
        evidence = Evidence(
            kind=KIND,
            claims_bytes=claims_bytes,
            proof={
                "quote": quote,
                "sig": sig,
                "pcrs": _pcr_map(self.pcrs, values),
                "chain": [c.public_bytes(Encoding.DER) for c in self.chain],
            },
        )
        self._check(evidence, digest)
        return evidence

    async def evidence(self, claims: Claims) -> Evidence:
        """`collect` under the name a node's `EvidenceProvider` calls."""
        return await self.collect(claims)

    def _check(self, evidence: Evidence, digest: bytes) -> None:
        """Catch a misconfigured node here, with a clear error, rather than at every client."""
        try:
            quote = parse_attest(evidence.proof["quote"])
            sig = parse_signature(evidence.proof["sig"])
            quoted_pcrs(evidence)
        except TpmDecodeError as e:
            raise AttestationError(f"tpm2_quote's output is unusable: {e}") from None
        if quote.extra_data != digest:
            raise AttestationError("tpm2_quote's quote does not carry the claims digest")
        if not signature_holds(self._ak_key, evidence.proof["quote"], sig):
            raise AttestationError(f"the AK certificate does not certify the AK {self.ak}")


def _pcr_map(pcrs: Sequence[int], values: bytes) -> dict[str, bytes]:
    if len(values) != PCR_SIZE * len(pcrs):
        raise AttestationError(
            f"tpm2_quote wrote {len(values)} bytes of PCR values for {len(pcrs)} PCRs"
        )
    return {str(i): values[PCR_SIZE * n : PCR_SIZE * (n + 1)] for n, i in enumerate(pcrs)}


def _load_certificates(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except (OSError, ValueError) as e:
        raise AttestationError(f"cannot read certificates from {path}: {e}") from None


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise AttestationError(f"AK scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")


async def create_ak(
    tcti: str,
    directory: Path,
    *,
    handle: int = DEFAULT_AK_HANDLE,
    scheme: str = "ecdsa",
    timeout: float = SETUP_TIMEOUT,
) -> AttestationKey:
    """Create an AK under the TPM's EK and persist it at `handle`, once per node.

    Leaves in `directory`: `ak.pem` (the AK public key, for the CA), `ak.name` and
    `ek.pub` (what a CA needs for `tpm2_makecredential`, to check the AK is on this TPM).
    Fails on `tpm2_evictcontrol` if `handle` already holds a key.
    """
    _check_scheme(scheme)
    files = trio.Path(directory)
    await files.mkdir(parents=True, exist_ok=True)
    ek, ak = files / "ek.ctx", files / "ak.ctx"
    steps: list[tuple[str, list[str]]] = [
        (
            "tpm2_createek",
            ["--key-algorithm=ecc", f"--ek-context={ek}", f"--public={files / 'ek.pub'}"],
        ),
        (
            "tpm2_createak",
            [
                f"--ek-context={ek}",
                f"--ak-context={ak}",
                f"--key-algorithm={SCHEMES[scheme]}",
                "--hash-algorithm=sha256",
                f"--signing-algorithm={scheme}",
                f"--ak-name={files / 'ak.name'}",
            ],
        ),
        # Without a resource manager, loaded objects stay in the TPM's few slots.
        ("tpm2_flushcontext", ["--transient-object"]),
        ("tpm2_evictcontrol", ["--hierarchy=o", f"--object-context={ak}", f"{handle:#x}"]),
        ("tpm2_flushcontext", ["--transient-object"]),
        (
            "tpm2_readpublic",
            [f"--object-context={handle:#x}", "--format=pem", f"--output={files / 'ak.pem'}"],
        ),
    ]
    for tool, args in steps:
        await _run(tool, args, tcti, timeout)
    return AttestationKey(
        handle=f"{handle:#x}", scheme=scheme, public_pem=await (files / "ak.pem").read_bytes()
    )


async def _run(tool: str, args: Sequence[str], tcti: str, timeout: float) -> None:
    """Run one tpm2-tools command against `tcti`, raising `AttestationError` if it fails."""
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(
                [tool, f"--tcti={tcti}", *args],
                stdout=subprocess.DEVNULL,
                capture_stderr=True,
                check=False,
            )
    except FileNotFoundError:
        raise AttestationError(f"{tool} not found: install tpm2-tools") from None
    except trio.TooSlowError:
        raise AttestationError(
            f"{tool} timed out after {timeout:g} s: is the TPM at {tcti!r} reachable?"
        ) from None
    except OSError as e:
        raise AttestationError(f"cannot run {tool}: {e}") from None
    if done.returncode != 0:
        raise AttestationError(
            f"{tool} failed (exit {done.returncode}) on {tcti!r}: {_tail(done.stderr)}"
        )


def _tail(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    tail = " | ".join(lines[-STDERR_LINES:]) or "no error output"
    return tail if len(tail) <= STDERR_CHARS else "..." + tail[-STDERR_CHARS:]
