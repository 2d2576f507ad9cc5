"""The API key store and `dbloom shim keys`."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dbloom.api import KEYS_FILE_NAME, ApiKeys, KeyStoreError, keys_app


def test_add_verify_list_remove(tmp_path: Path) -> None:
    keys = ApiKeys.in_home(tmp_path / "home")
    assert len(keys) == 0
    assert not keys.verify("dbk-anything")
    alice = keys.add("alice")
    bob = keys.add("bob.ci-2")
    assert alice.startswith("dbk-") and len(alice) > 40
    assert alice != bob
    assert keys.verify(alice) and keys.verify(bob)
    assert not keys.verify(alice + "x")
    assert not keys.verify("")
    assert [k.name for k in keys.list()] == ["alice", "bob.ci-2"]
    keys.remove("alice")
    assert not keys.verify(alice)
    assert keys.verify(bob)
    assert len(keys) == 1


def test_file_is_private_and_holds_only_hashes(tmp_path: Path) -> None:
    keys = ApiKeys.in_home(tmp_path)
    key = keys.add("alice")
    path = tmp_path / KEYS_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert key not in text
    assert key.removeprefix("dbk-") not in text
    assert [p.name for p in tmp_path.iterdir()] == [KEYS_FILE_NAME]
    (entry,) = json.loads(text)["keys"]
    assert set(entry) == {"name", "created", "sha256"}


def test_another_store_sees_changes(tmp_path: Path) -> None:
    """The running shim's store picks up keys added or removed by the CLI."""
    shim_view = ApiKeys.in_home(tmp_path)
    cli_view = ApiKeys.in_home(tmp_path)
    key = cli_view.add("alice")
    assert shim_view.verify(key)
    cli_view.remove("alice")
    assert not shim_view.verify(key)


def test_refusals(tmp_path: Path) -> None:
    keys = ApiKeys.in_home(tmp_path)
    keys.add("alice")
    with pytest.raises(KeyStoreError, match="already exists"):
        keys.add("alice")
    with pytest.raises(KeyStoreError, match="no API key named"):
        keys.remove("bob")
    for bad in ("", "-x", "a b", "x" * 65, "a/b"):
        with pytest.raises(KeyStoreError, match="key name"):
            keys.add(bad)


def test_unsafe_or_malformed_file_is_refused(tmp_path: Path) -> None:
    keys = ApiKeys.in_home(tmp_path)
    key = keys.add("alice")
    path = tmp_path / KEYS_FILE_NAME
    os.chmod(path, 0o644)
    with pytest.raises(KeyStoreError, match="chmod 600"):
        keys.verify(key)
    os.chmod(path, 0o600)
    assert keys.verify(key)
    for broken in ("{", '{"keys": 5}', '{"keys": [{"name": "a"}]}', "[]"):
        path.write_text(broken)
        with pytest.raises(KeyStoreError, match="malformed"):
            ApiKeys.in_home(tmp_path).list()


def test_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    home = ["--home", str(tmp_path)]
    added = runner.invoke(keys_app, ["add", "alice", *home])
    assert added.exit_code == 0, added.output
    key = added.stdout.strip()
    assert key.startswith("dbk-")
    assert "shown only once" in added.stderr
    assert ApiKeys.in_home(tmp_path).verify(key)
    listed = runner.invoke(keys_app, ["list", *home])
    assert listed.exit_code == 0 and "alice" in listed.stdout and key not in listed.stdout
    again = runner.invoke(keys_app, ["add", "alice", *home])
    assert again.exit_code == 1 and "already exists" in again.stderr
    removed = runner.invoke(keys_app, ["remove", "alice", *home])
    assert removed.exit_code == 0
    assert not ApiKeys.in_home(tmp_path).verify(key)
    missing = runner.invoke(keys_app, ["remove", "alice", *home])
    assert missing.exit_code == 1 and "no API key named" in missing.stderr
    empty = runner.invoke(keys_app, ["list", *home])
    assert "no API keys" in empty.stdout
