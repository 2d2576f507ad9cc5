"""Bad files and arguments, as an audit of the CLI fed them: one line, exit 1, no data lost."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from dbloom.attest import measure_software
from dbloom.attest._tlog import TransparencyLog
from dbloom.inference import build_tiny_model

DBLOOM = [sys.executable, "-m", "dbloom.cli"]


def run(
    *args: str, home: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "DBLOOM_HOME": str(home), "HF_HUB_OFFLINE": "1", "DBLOOM_CONFIG": ""}
    full.update(env or {})
    return subprocess.run(
        [*DBLOOM, *args], capture_output=True, text=True, timeout=timeout, env=full
    )


def one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert needle in result.stderr, result.stderr


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny")


def test_make_tiny_never_replaces_a_folders_files(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my own config")
    one_line_error(run("models", "make-tiny", str(mine), home=tmp_path), "not an empty folder")
    assert (mine / "config.json").read_text() == "my own config"
    assert sorted(p.name for p in mine.iterdir()) == ["config.json"]
    # An empty argument (an unset variable in a script) means the current folder.
    one_line_error(run("models", "make-tiny", "", home=tmp_path), "not an empty folder")
    one_line_error(
        run("models", "make-tiny", str(tmp_path / "seeded"), "--seed", "-1", home=tmp_path),
        "seed must be",
    )
    assert not (tmp_path / "seeded").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_make_tiny_fills_an_empty_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    made = run("models", "make-tiny", str(empty), home=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (empty / "config.json").is_file() and (empty / "model.safetensors").is_file()


def _copy_with(model: Path, folder: Path, *, config: object = None, weights: bytes = b"") -> Path:
    folder.mkdir()
    for file in model.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if weights:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


@pytest.mark.parametrize(
    ("weights", "needle"),
    [
        (struct.pack("<Q", 1 << 63) + b"{}", "cannot hold"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 30) + b'{"w": {"shape": ["a", 10]}}   ', "no valid shape"),
        (struct.pack("<Q", 4000) + b"[" * 4000, "unreadable weights"),
        (b"\x01", "shorter than a safetensors header"),
    ],
)
def test_models_info_refuses_hostile_weights(
    model: Path, tmp_path: Path, weights: bytes, needle: str
) -> None:
    folder = _copy_with(model, tmp_path / "bad", weights=weights)
    one_line_error(run("models", "info", str(folder), home=tmp_path, timeout=30), needle)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"vocab_size": "abc"}, "is not a count"),
        ({"vocab_size": None, "text_config": [1]}, "should be an object"),
        ({"quantization": 4}, "should be an object"),
    ],
)
def test_models_info_refuses_a_malformed_config(
    model: Path, tmp_path: Path, change: dict[str, object], needle: str
) -> None:
    config = {**json.loads((model / "config.json").read_text()), **change}
    folder = _copy_with(model, tmp_path / "bad", config=config)
    one_line_error(run("models", "info", str(folder), home=tmp_path), needle)


def test_a_weights_fifo_does_not_hang(model: Path, tmp_path: Path) -> None:
    folder = _copy_with(model, tmp_path / "fifo")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    one_line_error(run("models", "info", str(folder), home=tmp_path, timeout=30), "regular file")


def test_config_files_that_cannot_be_read(tmp_path: Path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_bytes(b"\xff\xfe[peer]\n")
    one_line_error(run("keys", "show", home=tmp_path, env={"DBLOOM_CONFIG": str(bad)}), "UTF-8")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    result = run("keys", "show", home=tmp_path, env={"DBLOOM_CONFIG": str(fifo)}, timeout=30)
    one_line_error(result, "not a regular file")


def test_dht_put_reads_no_more_than_a_record(tmp_path: Path) -> None:
    args = ("dht", "put", "key", "/dev/zero", "--bootstrap", "/ip4/127.0.0.1/tcp/1")
    one_line_error(run(*args, home=tmp_path, timeout=30), "not a regular file")
    args = ("dht", "put", "key", str(tmp_path), "--bootstrap", "/ip4/127.0.0.1/tcp/1")
    one_line_error(run(*args, home=tmp_path, timeout=30), "not a regular file")


def test_status_shows_a_damaged_status_file(tmp_path: Path) -> None:
    damaged = {
        "v": 1,
        "pid": 10**20,
        "updated_ms": 10**400,
        "availability": [1],
        "models": [1, 2],
        "earnings": {"micro": "abc"},
        "attestation": "x",
    }
    (tmp_path / "peer-status.json").write_text(json.dumps(damaged))
    result = run("status", home=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "not running" in result.stdout and "models" in result.stdout


def test_shim_options_are_checked_before_it_starts(tmp_path: Path) -> None:
    one_line_error(run("shim", "--attest-kinds", "bogus", home=tmp_path), "--attest-kinds")
    one_line_error(run("shim", "--require", "bogus", home=tmp_path), "--require")
    one_line_error(run("shim", "--log-key", "zz", home=tmp_path), "--log-key")


def test_os_errors_name_the_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.write_text("a file, not a folder")
    one_line_error(run("keys", "init", home=home), str(home))


def test_an_unexpected_error_is_one_line_unless_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dbloom.cli import main as cli_main

    def broken() -> None:
        raise RuntimeError("something no command expected")

    monkeypatch.setattr(cli_main, "app", broken)
    monkeypatch.setattr(cli_main.state, "debug", False)
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "unexpected RuntimeError: something no command expected" in err
    assert "--debug" in err and "Traceback" not in err
    monkeypatch.setattr(cli_main.state, "debug", True)
    with pytest.raises(RuntimeError):
        cli_main.main()


def test_a_dangling_key_link_is_named_not_recreated(tmp_path: Path) -> None:
    (tmp_path / "identity.key").symlink_to(tmp_path / "gone.key")
    one_line_error(run("keys", "show", home=tmp_path), "which does not exist")
    one_line_error(run("keys", "init", home=tmp_path), "already exists")
    assert not (tmp_path / "gone.key").exists()


def test_ledger_verify_does_not_wait_on_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "proof"
    os.mkfifo(fifo)
    result = run("ledger", "verify", str(fifo), "--root", "00" * 32, home=tmp_path, timeout=30)
    one_line_error(result, "not a regular file")


def test_a_refused_public_bind_writes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    one_line_error(run("shim", "--host", "0.0.0.0", home=home), "requires API keys")
    assert not home.exists()


def test_a_bad_value_in_the_config_file_is_blamed_on_the_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[peer]\nmax_batch = 0\n")
    result = run("peer", "--dry-run", home=tmp_path, env={"DBLOOM_CONFIG": str(config)})
    one_line_error(result, "[peer] max_batch = 0")
    assert "DBLOOM_MAX_BATCH" not in result.stderr


def test_a_groups_commands_have_config_tables_of_their_own(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    missing = tmp_path / "elsewhere.sqlite3"
    config.write_text(f'[ledger.summary]\nledger = "{missing}"\n')
    result = run("ledger", "summary", home=tmp_path, env={"DBLOOM_CONFIG": str(config)})
    one_line_error(result, f"no ledger at {missing}")  # the file's default was used
    config.write_text("[sim.run]\nbogus = 1\n")
    result = run("sim", "list", home=tmp_path, env={"DBLOOM_CONFIG": str(config)})
    one_line_error(result, "[sim.run] has no option bogus")


def test_models_list_with_a_file_for_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    one_line_error(run("models", "list", "--cache-dir", str(cache), home=tmp_path), str(cache))


def test_a_config_file_named_but_missing_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "typo.toml"
    one_line_error(
        run("keys", "show", home=tmp_path, env={"DBLOOM_CONFIG": str(missing)}),
        f"DBLOOM_CONFIG names {missing}, which does not exist",
    )
    # Empty means no file at all, even where the default one is broken.
    user = tmp_path / "user"
    (user / ".config" / "dbloom").mkdir(parents=True)
    (user / ".config" / "dbloom" / "config.toml").write_text("[nonsense]\n")
    shown = run("keys", "show", home=tmp_path, env={"DBLOOM_CONFIG": "", "HOME": str(user)})
    assert "no identity key" in shown.stderr, shown.stderr
    assert "nonsense" not in shown.stderr
    # Unset: the default file is read (and its mistake named).
    env = {k: v for k, v in os.environ.items() if k != "DBLOOM_CONFIG"}
    env.update({"DBLOOM_HOME": str(tmp_path), "HOME": str(user)})
    default = subprocess.run(
        [*DBLOOM, "keys", "show"], capture_output=True, text=True, timeout=60, env=env
    )
    assert default.returncode == 1 and "[nonsense]" in default.stderr


def test_peer_refuses_a_log_proof_that_proves_nothing(tmp_path: Path, model: Path) -> None:
    peer = ("peer", "--dry-run", "-m", str(model), "--log-proof")
    garbage = tmp_path / "garbage.proof"
    garbage.write_bytes(b"\x00not msgpack at all" * 10)
    one_line_error(run(*peer, str(garbage), home=tmp_path), "--log-proof")
    one_line_error(run(*peer, str(tmp_path), home=tmp_path), "not a regular file")
    log = TransparencyLog.init(tmp_path / "log")
    log.add(b"\x11" * 32)
    log.add(b"\x22" * 32)
    other = tmp_path / "other.proof"
    other.write_bytes(log.inclusion_bundle(b"\x22" * 32).encode())
    one_line_error(run(*peer, str(other), home=tmp_path), "is not in the log")
    mine = measure_software().digest
    log.add(mine)
    good = tmp_path / "good.proof"
    good.write_bytes(log.inclusion_bundle(mine).encode())
    result = run(*peer, str(good), home=tmp_path)
    assert result.returncode == 0, result.stderr
