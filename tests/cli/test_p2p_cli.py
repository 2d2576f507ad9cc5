"""`dbloom keys` and `dbloom p2p` as an operator runs them: real processes on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

DBLOOM = [sys.executable, "-m", "dbloom.cli"]


def run(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DBLOOM_HOME": str(home)}
    return subprocess.run(
        [*DBLOOM, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_keys_init_and_show(tmp_path: Path) -> None:
    created = run("keys", "init", home=tmp_path)
    assert created.returncode == 0, created.stderr
    peer_id = created.stdout.split()[2]
    assert peer_id.startswith("12D3KooW")
    shown = run("keys", "show", home=tmp_path)
    assert shown.returncode == 0 and peer_id in shown.stdout
    again = run("keys", "init", home=tmp_path)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr


def test_keys_show_refuses_open_key(tmp_path: Path) -> None:
    run("keys", "init", home=tmp_path)
    os.chmod(tmp_path / "identity.key", 0o644)
    shown = run("keys", "show", home=tmp_path)
    assert shown.returncode == 1
    assert "chmod 600" in shown.stderr and "Traceback" not in shown.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["p2p", "ping", "not-an-address"], "must start with '/'"),
        (["p2p", "ping", "/ip4/127.0.0.1/tcp/1"], "connection refused"),
        (["p2p", "id", "/ip4/999.0.0.1/tcp/1"], "invalid /ip4"),
    ],
)
def test_bad_targets_give_one_line_and_exit_1(tmp_path: Path, args: list[str], needle: str) -> None:
    result = run(*args, home=tmp_path)
    assert result.returncode == 1
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run("--debug", "p2p", "ping", "/ip4/127.0.0.1/tcp/1", home=tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr


async def test_serve_ping_and_id(tmp_path: Path) -> None:
    env = {**os.environ, "DBLOOM_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(
            lambda task_status: trio.run_process(  # noqa: ASYNC105
                [*DBLOOM, "p2p", "serve", "--listen", "/ip4/127.0.0.1/tcp/0"],
                stdout=subprocess.PIPE,
                env=env,
                check=False,
                task_status=task_status,
            )
        )
        assert proc.stdout is not None
        buffer = b""
        with trio.fail_after(30):
            while b"\n" not in buffer:
                buffer += await proc.stdout.receive_some()
        line = buffer.decode().splitlines()[0]
        assert line.startswith("listening on /ip4/127.0.0.1/tcp/")
        address = line.removeprefix("listening on ")
        assert "/p2p/12D3KooW" in address

        pinged = await trio.run_process(
            [*DBLOOM, "p2p", "ping", address, "-n", "3"], capture_stdout=True, env=env
        )
        out = pinged.stdout.decode()
        assert out.count("ms") >= 3 and "3 pings: min" in out

        identified = await trio.run_process(
            [*DBLOOM, "p2p", "id", address], capture_stdout=True, env=env
        )
        text = identified.stdout.decode()
        assert (
            "dbloom/" in text and "/ipfs/ping/1.0.0" in text and address.split("/p2p/")[1] in text
        )

        proc.send_signal(2)  # Ctrl-C
        with trio.fail_after(10):
            await proc.wait()
        assert proc.returncode == 0


def test_demo_finds_a_model_and_streams_an_answer(tmp_path: Path) -> None:
    result = run("demo", home=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("dev attestation") == 3
    assert "OpenAI-compatible API on http://127.0.0.1:" in out
    assert "served by peer " in out and "; 48 tokens;" in out
    assert "time to first token" in out and "done:" in out
    assert "countersigned by the shim, gossiped to 3 of 3 peers' ledgers" in out
    assert "shows 1 paid receipt(s)" in out
