"""The identity key on disk."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dbloom.p2p import KeyFileError, create_identity, load_identity, load_or_create_identity


def test_created_key_is_private_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "home" / "identity.key"
    pair = create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_identity(path).peer_id == pair.peer_id
    assert load_or_create_identity(path).peer_id == pair.peer_id


def test_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    create_identity(path)
    with pytest.raises(KeyFileError, match="already exists"):
        create_identity(path)


def test_refuses_a_key_others_can_read(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    create_identity(path)
    os.chmod(path, 0o644)
    with pytest.raises(
        KeyFileError, match=r"accessible by other users \(mode 0644\); run `chmod 600"
    ):
        load_identity(path)


@pytest.mark.parametrize("content", [b"", b"garbage", b"\x08\x01\x12\x40" + b"\x00" * 64])
def test_malformed_key_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="malformed"):
        load_identity(path)


def test_missing_key_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="dbloom keys init"):
        load_identity(tmp_path / "identity.key")
