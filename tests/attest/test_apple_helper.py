"""The helper-app provider, run against a fake `dbloom-attest-helper` as a real subprocess."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio
from apple_fixtures import (
    APP_ID,
    NODE_KEY,
    FakeCA,
    enroll_mda,
    make_ca,
    make_claims,
)

from dbloom.attest import AttestationError, Policy, Reason, VerifierState, verify_evidence
from dbloom.attest._appattest import KIND as APP_ATTEST
from dbloom.attest._appattest import AppAttestVerifier
from dbloom.attest._apple_helper import MAX_STDOUT, AppleHelperProvider
from dbloom.attest._mda import KIND as MDA
from dbloom.attest._mda import MdaVerifier

CA = make_ca("Helper")
FIXTURES = Path(__file__).parent
NONCE = b"\x13" * 32


def write_helper(directory: Path, body: str) -> str:
    """An executable Python script standing in for the signed helper app."""
    path = directory / "dbloom-attest-helper"
    path.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    path.chmod(0o755)
    return str(path)


def fake_helper(directory: Path, ca: FakeCA = CA) -> str:
    ca.save(directory)
    return write_helper(
        directory,
        f"sys.path[:0] = [{str(FIXTURES)!r}, {str(FIXTURES.parent)!r}]\n"
        "from pathlib import Path\n"
        "from apple_fixtures import fake_helper_main\n"
        f"sys.exit(fake_helper_main(sys.argv[1:], Path({str(directory)!r})))",
    )


def judge(evidence_raw: bytes, kind: str, state: VerifierState) -> set[Reason]:
    verifier = AppAttestVerifier() if kind == APP_ATTEST else MdaVerifier()
    verdict = verify_evidence(
        evidence_raw,
        policy=Policy(roots={kind: (CA.root,)}, app_ids=frozenset({APP_ID})),
        peer=NODE_KEY.peer_id,
        nonce=NONCE,
        verifiers={kind: verifier},
        state=state,
    )
    assert verdict.trusted or verdict.refusals
    return set(verdict.reasons)


async def test_app_attest_then_assertions_through_the_helper(tmp_path: Path) -> None:
    provider = AppleHelperProvider(APP_ATTEST, helper=fake_helper(tmp_path))
    state = VerifierState()
    evidence = await provider.evidence(make_claims(nonce=NONCE))
    assert evidence.kind == APP_ATTEST and set(evidence.proof) == {"attestation", "key_id"}
    assert provider.key_id == evidence.proof["key_id"]
    assert judge(evidence.encode(), APP_ATTEST, state) == set()
    for _ in range(2):
        later = await provider.assertion(make_claims(nonce=NONCE))
        assert set(later.proof) == {"assertion", "key_id"}
        assert judge(later.encode(), APP_ATTEST, state) == set()
    assert state.app_attest_counters[provider.key_id] == 2


async def test_an_unknown_key_is_a_helper_failure(tmp_path: Path) -> None:
    provider = AppleHelperProvider(APP_ATTEST, helper=fake_helper(tmp_path))
    with pytest.raises(AttestationError, match=r"unknown or invalidated key, exit 5.*no such"):
        await provider.assertion(make_claims(nonce=NONCE), key_id=b"\x01" * 32)
    with pytest.raises(AttestationError, match="attest first"):
        await provider.assertion(make_claims(nonce=NONCE))


async def test_mda_through_the_helper(tmp_path: Path) -> None:
    helper = fake_helper(tmp_path)
    enroll_mda(tmp_path, CA, NODE_KEY)
    provider = AppleHelperProvider(MDA, helper=helper)
    evidence = await provider.evidence(make_claims(nonce=NONCE))
    assert evidence.kind == MDA and set(evidence.proof) == {"chain", "mda_nonce", "sig"}
    assert judge(evidence.encode(), MDA, VerifierState()) == set()


async def test_a_missing_helper_says_what_to_install(tmp_path: Path) -> None:
    provider = AppleHelperProvider(MDA, helper=str(tmp_path / "nowhere" / "dbloom-attest-helper"))
    with pytest.raises(AttestationError, match=r"not found; on a Mac install the signed helper"):
        await provider.evidence(make_claims())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("print('App Attest is unavailable', file=sys.stderr); sys.exit(3)", "not supported"),
        ("sys.stderr.write('\\x1b[31mboom\\nmore'); sys.exit(4)", "service failed.*exit 4.*boom"),
        ("sys.exit(9)", r"unexpected failure, exit 9\): no error message"),
        ("print('not json')", "not JSON"),
        ("print('[' * 60000)", "not JSON"),
        ("print('{}')", "must print an object of chain, kind, sig, v"),
        (
            'print(\'{"v": 2, "kind": "apple-mda", "chain": [], "sig": ""}\')',
            "contract 2",
        ),
        (
            'print(\'{"v": 1, "kind": "apple-app-attest", "chain": [], "sig": ""}\')',
            "answered 'apple-app-attest'",
        ),
        (
            'print(\'{"v": 1, "kind": "apple-mda", "chain": ["a"], "sig": ""}\')',
            r"not \[leaf, intermediate\]",
        ),
        (
            'print(\'{"v": 1, "kind": "apple-mda", "chain": ["AA==", 5], "sig": ""}\')',
            "must be a base64 string",
        ),
        (
            'print(\'{"v": 1, "kind": "apple-mda", "chain": ["AA==", "AA=="], "sig": "%%%"}\')',
            "sig is not base64",
        ),
        ("sys.stdout.write('x' * (1 << 20))", f"more than {MAX_STDOUT} bytes"),
    ],
    ids=[
        "unsupported",
        "service",
        "odd-exit",
        "garbage",
        "deep-json",
        "wrong-fields",
        "contract",
        "kind",
        "chain",
        "chain-type",
        "base64",
        "flood",
    ],
)
async def test_helper_failures_are_attestation_errors(
    tmp_path: Path, body: str, message: str
) -> None:
    provider = AppleHelperProvider(MDA, helper=write_helper(tmp_path, body))
    with pytest.raises(AttestationError, match=message):
        await provider.evidence(make_claims())


async def test_a_helper_that_hangs_is_killed_at_the_timeout(tmp_path: Path) -> None:
    helper = write_helper(tmp_path, "import time; time.sleep(60)")
    provider = AppleHelperProvider(MDA, helper=helper, timeout=0.5)
    start = trio.current_time()
    with pytest.raises(AttestationError, match=r"did not answer within 0.5 s"):
        await provider.evidence(make_claims())
    assert trio.current_time() - start < 5


async def test_app_attest_output_is_checked_too(tmp_path: Path) -> None:
    short = json.dumps({"v": 1, "kind": APP_ATTEST, "key_id": "AAAA", "attestation": "AA=="})
    provider = AppleHelperProvider(APP_ATTEST, helper=write_helper(tmp_path, f"print({short!r})"))
    with pytest.raises(AttestationError, match="key_id is 3 bytes, not 32"):
        await provider.evidence(make_claims())


def test_only_apple_kinds_are_made() -> None:
    with pytest.raises(ValueError, match="not dev"):
        AppleHelperProvider("dev")
