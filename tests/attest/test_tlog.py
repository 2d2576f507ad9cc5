"""The file-backed transparency log, its inclusion bundles, and the client's check of them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from fuzzing import mutations
from hypothesis import given
from hypothesis import strategies as st

from dbloom.attest._errors import EvidenceDecodeError
from dbloom.attest._merkle import EMPTY_ROOT
from dbloom.attest._refusal import Reason, Refusal
from dbloom.attest._tlog import (
    MAX_BUNDLE,
    LogError,
    TransparencyLog,
    check_log_proof,
    decode_inclusion_bundle,
    measurement_leaf,
    verify_consistency,
)
from dbloom.p2p import DecodeError, LimitExceeded

M = [hashlib.sha256(bytes([i])).digest() for i in range(12)]


def new_log(tmp_path: Path, entries: int = 0) -> TransparencyLog:
    log = TransparencyLog.init(tmp_path / "log")
    for measurement in M[:entries]:
        log.add(measurement, note=f"build {measurement.hex()[:8]}")
    return log


def reasons(refusals: list[Refusal]) -> list[Reason]:
    return [r.reason for r in refusals]


def _valid_bundle() -> tuple[bytes, list[bytes]]:
    """A bundle for M[6] in a log of 11 entries, and the log's key (made once: hypothesis
    reruns the tests many times)."""
    with tempfile.TemporaryDirectory() as folder:
        log = new_log(Path(folder), entries=11)
        return log.inclusion_bundle(M[6]).encode(), [log.public_key]


VALID, TRUSTED = _valid_bundle()


def test_measurement_leaf_is_domain_separated() -> None:
    assert measurement_leaf(M[0]) == b"dbloom/measurement/v1\x00" + M[0]


def test_init_writes_a_private_key_and_an_empty_log(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    folder = tmp_path / "log"
    assert stat.S_IMODE((folder / "log.key").stat().st_mode) == 0o600
    assert (folder / "entries.jsonl").read_bytes() == b""
    head = log.head()
    assert (head.size, head.root) == (0, EMPTY_ROOT)
    assert head.verify(log.public_key) and len(log.public_key) == 32


def test_init_refuses_an_existing_log(tmp_path: Path) -> None:
    log = new_log(tmp_path, entries=2)
    with pytest.raises(LogError, match="already exists"):
        TransparencyLog.init(tmp_path / "log")
    (tmp_path / "log" / "log.key").unlink()
    with pytest.raises(LogError, match="already exists"):
        TransparencyLog.init(tmp_path / "log")
    assert len(log) == 2


def test_open_refuses_a_missing_log_or_an_open_key(tmp_path: Path) -> None:
    with pytest.raises(LogError, match="no transparency log"):
        TransparencyLog.open(tmp_path / "nowhere")
    new_log(tmp_path)
    os.chmod(tmp_path / "log" / "log.key", 0o644)
    with pytest.raises(LogError, match="chmod 600"):
        TransparencyLog.open(tmp_path / "log")


def test_add_dedupes_and_survives_reopening(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    assert [log.add(m) for m in M[:5]] == [0, 1, 2, 3, 4]
    assert log.add(M[2], note="again") == 2
    assert len(log) == 5 and log.index_of(M[4]) == 4 and log.index_of(M[9]) is None
    reopened = TransparencyLog.open(tmp_path / "log")
    assert len(reopened) == 5 and reopened.index_of(M[3]) == 3
    assert reopened.head().root == log.head().root
    assert reopened.public_key == log.public_key


def test_entries_are_json_lines_for_auditors(tmp_path: Path) -> None:
    new_log(tmp_path, entries=3).add(M[3], note="release 1.2 — “notes” may\nspan lines")
    lines = (tmp_path / "log" / "entries.jsonl").read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["index"] for e in entries] == [0, 1, 2, 3]
    assert [e["measurement"] for e in entries] == [m.hex() for m in M[:4]]
    assert entries[3]["note"] == "release 1.2 — “notes” may\nspan lines"
    assert all(isinstance(e["timestamp_ms"], int) for e in entries)


def test_add_refuses_bad_input(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    with pytest.raises(ValueError, match="32 bytes"):
        log.add(b"\x00" * 31)
    with pytest.raises(ValueError, match="note"):
        log.add(M[0], note="x" * 2000)
    assert len(log) == 0


def test_a_torn_last_line_is_ignored_then_repaired(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    new_log(tmp_path, entries=3)
    entries = tmp_path / "log" / "entries.jsonl"
    intact = entries.read_bytes()
    with entries.open("ab") as f:
        f.write(b'{"index": 3, "measurement": "00ff')
    with caplog.at_level(logging.WARNING):
        log = TransparencyLog.open(tmp_path / "log")
    assert "torn last entry" in caplog.text
    assert len(log) == 3
    assert log.add(M[7]) == 3
    assert entries.read_bytes().startswith(intact)
    assert len(entries.read_bytes().splitlines()) == 4
    assert TransparencyLog.open(tmp_path / "log").index_of(M[7]) == 3


def test_a_last_entry_without_its_newline_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = new_log(tmp_path, entries=2).head()
    expected = new_log(tmp_path / "fresh", entries=3).head().root
    entries = tmp_path / "log" / "entries.jsonl"
    entries.write_bytes(entries.read_bytes().rstrip(b"\n"))
    intact = entries.read_bytes()
    with caplog.at_level(logging.WARNING):
        reader = TransparencyLog.open(tmp_path / "log")
        writer = TransparencyLog.open(tmp_path / "log")
    assert "torn" not in caplog.text
    assert len(reader) == 2 and reader.head().root == old.root
    assert writer.add(M[2]) == 2
    assert entries.read_bytes().startswith(intact + b"\n")
    lines = entries.read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(line)["index"] for line in lines[:-1]] == [0, 1, 2]
    reader.refresh()
    for log in (reader, writer, TransparencyLog.open(tmp_path / "log")):
        assert [log.index_of(m) for m in M[:3]] == [0, 1, 2]
        new = log.head()
        assert new.root == expected
        assert verify_consistency(old, new, log.consistency_proof(2, 3), log.public_key) == []
        assert check_log_proof(log.inclusion_bundle(M[1]).encode(), M[1], [log.public_key]) == []


@pytest.mark.parametrize(
    "damage",
    [
        lambda lines: [lines[0], b"not json", *lines[2:]],
        lambda lines: [lines[0], b"[" * 100_000, *lines[2:]],
        lambda lines: [lines[0], lines[0].replace(b'"index": 0', b'"index": 1'), *lines[2:]],
        lambda lines: [lines[0], lines[2], lines[1]],
        lambda lines: [lines[0], lines[1].replace(b'"note"', b'"remark"'), lines[2]],
        lambda lines: [lines[0], lines[1].replace(b'"index": 1', b'"index": true'), lines[2]],
        lambda lines: [lines[0], lines[1].replace(M[1].hex().encode(), b"ABCD"), lines[2]],
        lambda lines: [
            lines[0],
            lines[1].replace(M[1].hex().encode(), M[1].hex().upper().encode()),
        ],
    ],
)
def test_a_damaged_entry_refuses_to_open(
    tmp_path: Path, damage: Callable[[list[bytes]], list[bytes]]
) -> None:
    new_log(tmp_path, entries=3)
    entries = tmp_path / "log" / "entries.jsonl"
    entries.write_bytes(b"\n".join(damage(entries.read_bytes().splitlines())) + b"\n")
    with pytest.raises(LogError, match="corrupted"):
        TransparencyLog.open(tmp_path / "log")


def test_two_handles_see_each_others_entries(tmp_path: Path) -> None:
    a = new_log(tmp_path)
    b = TransparencyLog.open(tmp_path / "log")
    assert a.add(M[0]) == 0
    assert b.add(M[1]) == 1
    assert b.add(M[0]) == 0
    assert len(a) == 1
    a.refresh()
    assert len(a) == 2 and a.index_of(M[1]) == 1 and a.head().root == b.head().root


def test_inclusion_bundle_round_trip_and_check(tmp_path: Path) -> None:
    log = new_log(tmp_path, entries=9)
    bundle = log.inclusion_bundle(M[5])
    raw = bundle.encode()
    assert len(raw) <= MAX_BUNDLE
    assert decode_inclusion_bundle(raw) == bundle
    assert bundle.index == 5 and bundle.sth.size == 9
    assert check_log_proof(raw, M[5], [log.public_key]) == []
    assert check_log_proof(raw, M[5], [b"\x01" * 32, log.public_key]) == []
    with pytest.raises(LogError, match="not in the log"):
        log.inclusion_bundle(M[10])


def test_check_log_proof_refusals(tmp_path: Path) -> None:
    log = new_log(tmp_path, entries=6)
    raw = log.inclusion_bundle(M[4]).encode()
    other = TransparencyLog.init(tmp_path / "other")
    assert reasons(check_log_proof(raw, M[4], [other.public_key])) == [Reason.BAD_LOG_SIGNATURE]
    assert reasons(check_log_proof(raw, M[4], [])) == [Reason.BAD_LOG_SIGNATURE]
    assert reasons(check_log_proof(raw, M[4], [b"short"])) == [Reason.BAD_LOG_SIGNATURE]
    [refusal] = check_log_proof(raw, M[3], [log.public_key])
    assert refusal.reason is Reason.NOT_LOGGED and "not in the log" in refusal.detail
    assert reasons(check_log_proof(raw, M[11], [])) == [
        Reason.BAD_LOG_SIGNATURE,
        Reason.NOT_LOGGED,
    ]
    assert reasons(check_log_proof(raw[:-5], M[4], [log.public_key])) == [Reason.MALFORMED]
    assert reasons(check_log_proof(b"", M[4], [log.public_key])) == [Reason.MALFORMED]
    oversized = b"\x00" * (MAX_BUNDLE + 1)
    [refusal] = check_log_proof(oversized, M[4], [log.public_key])
    assert refusal.reason is Reason.MALFORMED and "above" in refusal.detail


def test_a_misshapen_or_relabelled_proof_is_refused(tmp_path: Path) -> None:
    log = new_log(tmp_path, entries=6)
    bundle = log.inclusion_bundle(M[4])
    keys = [log.public_key]

    def check(**changes: object) -> list[Reason]:
        body = {**msgpack.unpackb(bundle.encode()), **changes}
        return reasons(check_log_proof(msgpack.packb(body), M[4], keys))

    assert check() == []
    assert check(path=list(bundle.path[:-1])) == [Reason.BAD_LOG_PROOF]
    assert check(path=[*bundle.path, bundle.path[0]]) == [Reason.BAD_LOG_PROOF]
    assert check(index=5) == [Reason.NOT_LOGGED]
    assert check(size=7) == [Reason.BAD_LOG_SIGNATURE, Reason.BAD_LOG_PROOF]
    assert check(timestamp_ms=bundle.sth.timestamp_ms + 1) == [Reason.BAD_LOG_SIGNATURE]
    assert check(index=6) == [Reason.MALFORMED]


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"v": 2}, "version"),
        ({"v": True}, "version"),
        ({"extra": 1}, "unknown fields extra"),
        ({"root": b"\x00" * 31}, "root must be 32 bytes"),
        ({"signature": "sig"}, "signature must be 64 bytes"),
        ({"size": 0}, "size must be an integer"),
        ({"size": 1.5}, "size must be an integer"),
        ({"index": -1}, "index must be an integer"),
        ({"timestamp_ms": 1 << 60}, "timestamp_ms must be"),
        ({"path": [b"\x00" * 32] * 65}, "path must be a list"),
        ({"path": [b"\x00" * 33]}, "32-byte hashes"),
        ({"path": b"\x00" * 32}, "path must be a list"),
    ],
)
def test_decoder_names_what_is_wrong(changes: dict[str, object], needle: str) -> None:
    body = {**msgpack.unpackb(VALID), **changes}
    with pytest.raises(EvidenceDecodeError, match=needle):
        decode_inclusion_bundle(msgpack.packb(body))


def test_decoder_refuses_missing_fields_non_maps_and_oversize() -> None:
    body = msgpack.unpackb(VALID)
    del body["signature"]
    with pytest.raises(EvidenceDecodeError, match="lacks signature"):
        decode_inclusion_bundle(msgpack.packb(body))
    with pytest.raises(EvidenceDecodeError, match="must be a map"):
        decode_inclusion_bundle(msgpack.packb([1, 2]))
    with pytest.raises(LimitExceeded):
        decode_inclusion_bundle(VALID + b"\x00" * MAX_BUNDLE)
    with pytest.raises(EvidenceDecodeError, match="not valid msgpack"):
        decode_inclusion_bundle(VALID + b"\x00")


def test_consistency_between_tree_heads(tmp_path: Path) -> None:
    log = new_log(tmp_path, entries=3)
    old = log.head()
    for m in M[3:10]:
        log.add(m)
    new = log.head()
    key = log.public_key
    proof = log.consistency_proof(old.size, new.size)
    assert verify_consistency(old, new, proof, key) == []
    assert verify_consistency(new, new, [], key) == []
    assert reasons(verify_consistency(new, old, proof, key)) == [Reason.BAD_LOG_PROOF]
    other = TransparencyLog.init(tmp_path / "other")
    assert reasons(verify_consistency(old, new, proof, other.public_key)) == [
        Reason.BAD_LOG_SIGNATURE,
        Reason.BAD_LOG_SIGNATURE,
    ]
    # A log that rewrote its history cannot prove its new head extends the old one.
    for m in (M[11], *M[1:10]):
        other.add(m)
    forked = other.head()
    forged = other.consistency_proof(3, 10)
    assert reasons(verify_consistency(old, forked, forged, other.public_key)) == [
        Reason.BAD_LOG_SIGNATURE,
        Reason.BAD_LOG_PROOF,
    ]


def _is_typed_decode_error(exc: Exception) -> bool:
    return isinstance(exc, EvidenceDecodeError | LimitExceeded) and isinstance(exc, DecodeError)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=70),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
field_names = st.sampled_from(
    ["v", "size", "root", "timestamp_ms", "signature", "index", "path", "other"]
)


@given(
    st.one_of(
        mutations(VALID),
        st.dictionaries(field_names, msgpack_values).map(msgpack.packb),
        st.builds(
            lambda changes: msgpack.packb({**msgpack.unpackb(VALID), **changes}),
            st.dictionaries(field_names, msgpack_values, max_size=2),
        ),
    )
)
def test_decoder_and_check_only_refuse(raw: bytes) -> None:
    try:
        decode_inclusion_bundle(raw)
    except Exception as exc:
        assert _is_typed_decode_error(exc), repr(exc)
    refusals = check_log_proof(raw, M[6], TRUSTED)
    assert all(isinstance(r, Refusal) for r in refusals)
    if raw != VALID:
        assert refusals or decode_inclusion_bundle(raw) == decode_inclusion_bundle(VALID)


@given(st.binary(max_size=MAX_BUNDLE + 16), st.binary(max_size=40))
def test_check_never_raises_on_arbitrary_bytes(raw: bytes, measurement: bytes) -> None:
    refusals = check_log_proof(raw, measurement, TRUSTED)
    assert refusals and all(isinstance(r, Refusal) for r in refusals)
