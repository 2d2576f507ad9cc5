"""The `tpm2` kind end to end: swtpm quotes through tpm2-tools, and the client judges it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from attest_helpers import fresh_nonce, make_claims
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from test_tpm import PCRS, attest, ecdsa_sig, make_pki

from dbloom.attest._certs import fingerprint
from dbloom.attest._errors import AttestationError
from dbloom.attest._evidence import Evidence, claims_digest
from dbloom.attest._policy import Policy, Verdict, verify_evidence
from dbloom.attest._refusal import Reason
from dbloom.attest._tpm import TpmVerifier, quoted_pcrs
from dbloom.attest._tpm_collect import AttestationKey, TpmProvider, create_ak
from dbloom.p2p import KeyPair

TOOLS = (
    "swtpm",
    "tpm2_createek",
    "tpm2_createak",
    "tpm2_flushcontext",
    "tpm2_evictcontrol",
    "tpm2_readpublic",
    "tpm2_quote",
    "tpm2_pcrextend",
)
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
needs_swtpm = pytest.mark.skipif(
    bool(MISSING), reason=f"needs swtpm and tpm2-tools (missing {', '.join(MISSING)})"
)
KEY = KeyPair.from_seed(b"s" * 32)
PKI = make_pki("swtpm test")
POLICY = Policy(allowed_kinds=frozenset({"tpm2"}), roots={"tpm2": (PKI.root,)})


def port_pair() -> tuple[socket.socket, socket.socket]:
    """Two bound sockets on ports P and P+1 of 127.0.0.1 (swtpm's TCTI wants neighbours)."""
    for _ in range(100):
        low = socket.socket()
        low.bind(("127.0.0.1", 0))
        high = socket.socket()
        try:
            high.bind(("127.0.0.1", low.getsockname()[1] + 1))
        except OSError:
            low.close()
            high.close()
            continue
        return low, high
    raise RuntimeError("no two neighbouring free ports on 127.0.0.1")


def start_swtpm(state: Path) -> tuple[subprocess.Popen[bytes], int]:
    low, high = port_pair()
    port = low.getsockname()[1]
    low.close()
    high.close()
    process = subprocess.Popen(
        [
            "swtpm", "socket", "--tpm2",
            "--tpmstate", f"dir={state}",
            "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--flags", "not-need-init,startup-clear",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 5
    while process.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port + 1), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.01)
    stop(process)
    raise RuntimeError(f"swtpm did not start on 127.0.0.1:{port}")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def tcti(tmp_path: Path) -> Iterator[str]:
    """A fresh software TPM for one test, killed when it ends."""
    state = tmp_path / "swtpm"
    state.mkdir()
    try:
        process, port = start_swtpm(state)
    except RuntimeError:  # another process took the ports between our probe and swtpm
        process, port = start_swtpm(state)
    try:
        yield f"swtpm:host=127.0.0.1,port={port}"
    finally:
        stop(process)


def write_chain(directory: Path, key: AttestationKey) -> list[Path]:
    """The AK certificate (PEM) and the intermediate (DER), as an operator would get them."""
    public = serialization.load_pem_public_key(key.public_pem)
    assert isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    cert = PKI.issue(public)
    leaf, intermediate = directory / "ak-cert.pem", directory / "intermediate.der"
    leaf.write_bytes(cert.public_bytes(Encoding.PEM))
    intermediate.write_bytes(PKI.intermediate.public_bytes(Encoding.DER))
    return [leaf, intermediate]


def judge(raw: bytes, nonce: bytes) -> Verdict:
    return verify_evidence(
        raw, policy=POLICY, peer=KEY.peer_id, nonce=nonce, verifiers={"tpm2": TpmVerifier()}
    )


async def pcr_extend(tcti: str, pcr: int, data: bytes) -> None:
    await trio.run_process(
        ["tpm2_pcrextend", f"--tcti={tcti}", f"{pcr}:sha256={data.hex()}"],
        capture_stderr=True,
    )


@needs_swtpm
async def test_quote_round_trip_and_what_breaks_it(tcti: str, tmp_path: Path) -> None:
    key = await create_ak(tcti, tmp_path / "ak")
    assert (tmp_path / "ak" / "ak.pem").read_bytes() == key.public_pem
    chain = write_chain(tmp_path, key)
    await pcr_extend(tcti, 3, b"\x03" * 32)
    await pcr_extend(tcti, 16, b"\x10" * 32)
    provider = TpmProvider(tcti, key.handle, chain, pcrs=[16, 0, 3, 7])
    nonce = fresh_nonce()
    evidence = await provider.collect(make_claims(KEY, nonce))
    raw = evidence.encode()

    verdict = judge(raw, nonce)
    assert verdict.accepted, str(verdict)
    assert verdict.trusted
    assert verdict.hardware_id == fingerprint(provider.chain[0])
    pcrs = quoted_pcrs(evidence)
    assert list(pcrs) == [0, 3, 7, 16]
    assert pcrs[0] == pcrs[7] == bytes(32)
    assert len({pcrs[0], pcrs[3], pcrs[16]}) == 3

    quote = evidence.proof["quote"]
    for index, reasons in (
        (0, {Reason.MALFORMED, Reason.BAD_SIGNATURE}),  # the magic
        (len(quote) - 1, {Reason.BAD_SIGNATURE, Reason.BINDING_MISMATCH}),  # the PCR digest
    ):
        tampered = bytearray(quote)
        tampered[index] ^= 0x01
        proof = {**evidence.proof, "quote": bytes(tampered)}
        assert judge(Evidence("tpm2", evidence.claims_bytes, proof).encode(), nonce).reasons == (
            reasons
        )

    other_nonce = fresh_nonce()
    assert judge(raw, other_nonce).reasons == {Reason.NONCE_MISMATCH}
    grafted = Evidence("tpm2", make_claims(KEY, other_nonce).encode(), evidence.proof)
    assert judge(grafted.encode(), other_nonce).reasons == {Reason.BINDING_MISMATCH}


@needs_swtpm
@pytest.mark.parametrize("scheme", ["rsassa", "rsapss"])
async def test_rsa_attestation_keys(tcti: str, tmp_path: Path, scheme: str) -> None:
    key = await create_ak(tcti, tmp_path / "ak", scheme=scheme, handle=0x81000010)
    assert key.handle == "0x81000010"
    provider = TpmProvider(tcti, key.handle, write_chain(tmp_path, key), scheme=scheme)
    nonce = fresh_nonce()
    verdict = judge((await provider.collect(make_claims(KEY, nonce))).encode(), nonce)
    assert verdict.accepted, str(verdict)


@needs_swtpm
async def test_concurrent_quotes_take_turns(tcti: str, tmp_path: Path) -> None:
    key = await create_ak(tcti, tmp_path / "ak")
    provider = TpmProvider(tcti, key.handle, write_chain(tmp_path, key))
    nonces = [fresh_nonce() for _ in range(3)]
    raws: dict[bytes, bytes] = {}

    async def one(nonce: bytes) -> None:
        raws[nonce] = (await provider.evidence(make_claims(KEY, nonce))).encode()

    async with trio.open_nursery() as nursery:
        for nonce in nonces:
            nursery.start_soon(one, nonce)
    assert all(judge(raws[nonce], nonce).accepted for nonce in nonces)


@needs_swtpm
async def test_certificate_for_another_key_is_caught_at_the_node(tcti: str, tmp_path: Path) -> None:
    key = await create_ak(tcti, tmp_path / "ak")
    cert = PKI.issue(ec.generate_private_key(ec.SECP256R1()).public_key())
    (tmp_path / "wrong.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    provider = TpmProvider(tcti, key.handle, [tmp_path / "wrong.pem"])
    with pytest.raises(AttestationError, match="does not certify the AK 0x81000002"):
        await provider.collect(make_claims(KEY, fresh_nonce()))


@needs_swtpm
async def test_tool_failures_carry_their_stderr(tcti: str, tmp_path: Path) -> None:
    key = await create_ak(tcti, tmp_path / "ak")
    with pytest.raises(AttestationError, match=r"^tpm2_evictcontrol failed \(exit \d+\) on .*: "):
        await create_ak(tcti, tmp_path / "again")
    provider = TpmProvider(tcti, "0x81000077", write_chain(tmp_path, key))
    with pytest.raises(AttestationError, match=r"tpm2_quote failed .*ERROR"):
        await provider.collect(make_claims(KEY, fresh_nonce()))


# --- failures that need no TPM ------------------------------------------------------------


@pytest.fixture
def chain_file(tmp_path: Path) -> Path:
    path = tmp_path / "ak-cert.der"
    cert = PKI.issue(ec.generate_private_key(ec.SECP256R1()).public_key())
    path.write_bytes(cert.public_bytes(Encoding.DER))
    return path


@pytest.mark.skipif(shutil.which("tpm2_quote") is None, reason="needs tpm2-tools")
async def test_unreachable_tpm(chain_file: Path) -> None:
    low, high = port_pair()
    port = low.getsockname()[1]
    low.close()
    high.close()
    provider = TpmProvider(f"swtpm:host=127.0.0.1,port={port}", "0x81000002", [chain_file])
    with pytest.raises(AttestationError, match=r"^tpm2_quote failed .*[Cc]onnect"):
        await provider.collect(make_claims(KEY, fresh_nonce()))


@pytest.mark.skipif(shutil.which("tpm2_quote") is None, reason="needs tpm2-tools")
async def test_silent_tpm_times_out(chain_file: Path) -> None:
    low, high = port_pair()
    with low, high:
        low.listen()
        high.listen()
        port = low.getsockname()[1]
        provider = TpmProvider(
            f"swtpm:host=127.0.0.1,port={port}", "0x81000002", [chain_file], timeout=0.5
        )
        with pytest.raises(AttestationError, match=r"^tpm2_quote timed out after 0.5 s"):
            await provider.collect(make_claims(KEY, fresh_nonce()))


async def test_missing_tools(
    chain_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    provider = TpmProvider("device:/dev/tpmrm0", "0x81000002", [chain_file])
    with pytest.raises(AttestationError, match="tpm2_quote not found: install tpm2-tools"):
        await provider.collect(make_claims(KEY, fresh_nonce()))
    with pytest.raises(AttestationError, match="tpm2_createek not found"):
        await create_ak("device:/dev/tpmrm0", tmp_path / "ak")


FAKE_QUOTE = """#!/bin/sh
for arg in "$@"; do
    case "$arg" in
        --message=*) cp "$FAKE/quote" "${arg#*=}" ;;
        --signature=*) cp "$FAKE/sig" "${arg#*=}" ;;
        --pcr=*) cp "$FAKE/pcrs" "${arg#*=}" ;;
    esac
done 2>/dev/null
"""
FAILING_QUOTE = """#!/bin/sh
echo "WARNING: noise" >&2
echo >&2
printf 'ERROR: a\\nERROR: b\\nERROR: c\\nERROR: TPM said no\\n' >&2
exit 3
"""


def fake_tpm2_quote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, **outputs: bytes
) -> None:
    """Put a `tpm2_quote` first on PATH that copies `outputs` where the real one writes."""
    tools, fake = tmp_path / "tools", tmp_path / "fake"
    tools.mkdir()
    fake.mkdir()
    (tools / "tpm2_quote").write_text(script)
    (tools / "tpm2_quote").chmod(0o755)
    for name, data in outputs.items():
        (fake / name).write_bytes(data)
    monkeypatch.setenv("PATH", f"{tools}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE", str(fake))


CLAIMS = make_claims(KEY, fresh_nonce())
VALUES = b"".join(PCRS[i] for i in range(8))
SIG = ecdsa_sig(1, 1)


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({"quote": b"x" * 300, "sig": SIG, "pcrs": b"x" * 256}, "output is unusable: quote magic"),
        ({"quote": attest(b"", range(8)), "sig": b"", "pcrs": VALUES}, "output is unusable: sigAlg is truncated"),
        ({"quote": attest(b"", range(8)), "sig": SIG, "pcrs": VALUES[1:]}, "255 bytes of PCR"),
        ({"quote": attest(b"", range(8)), "sig": SIG, "pcrs": VALUES[::-1]}, "do not hash to"),
        ({"quote": attest(b"", range(8)), "sig": SIG, "pcrs": VALUES}, "not carry the claims"),
        ({"quote": attest(claims_digest(CLAIMS.encode()), range(8)), "sig": SIG, "pcrs": VALUES},
         "does not certify the AK 0x81000002"),
        ({"sig": SIG, "pcrs": VALUES}, "tpm2_quote left no output"),
    ],
)  # fmt: skip
async def test_unusable_output_is_caught_at_the_node(
    chain_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    outputs: dict[str, bytes],
    message: str,
) -> None:
    fake_tpm2_quote(tmp_path, monkeypatch, FAKE_QUOTE, **outputs)
    provider = TpmProvider("device:/dev/tpmrm0", "0x81000002", [chain_file])
    with pytest.raises(AttestationError, match=message):
        await provider.collect(CLAIMS)


async def test_failing_tool_reports_its_last_lines(
    chain_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_tpm2_quote(tmp_path, monkeypatch, FAILING_QUOTE)
    provider = TpmProvider("device:/dev/tpmrm0", "0x81000002", [chain_file])
    with pytest.raises(AttestationError) as failure:
        await provider.collect(CLAIMS)
    assert str(failure.value) == (
        "tpm2_quote failed (exit 3) on 'device:/dev/tpmrm0': "
        "ERROR: a | ERROR: b | ERROR: c | ERROR: TPM said no"
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"scheme": "sm2"}, "AK scheme must be one of ecdsa, rsassa, rsapss"),
        ({"pcrs": [24]}, "PCR selection must be PCRs 0 to 23"),
        ({"pcrs": []}, "PCR selection must be PCRs 0 to 23"),
        ({"chain": []}, "the AK certificate chain is empty"),
        ({"chain": [Path("no-such-certificate.pem")]}, "cannot read certificates"),
    ],
)
def test_operator_configuration_errors(
    chain_file: Path, changes: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"chain": [chain_file], **changes}
    with pytest.raises(AttestationError, match=message):
        TpmProvider("device:/dev/tpmrm0", "0x81000002", **arguments)  # type: ignore[arg-type]
