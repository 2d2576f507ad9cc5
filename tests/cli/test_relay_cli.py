"""`dbloom relay` as an operator runs it: a real process on loopback, stopped with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import trio

DBLOOM = [sys.executable, "-m", "dbloom.cli"]


def test_relay_help_names_its_limits(tmp_path: Path) -> None:
    env = {**os.environ, "DBLOOM_HOME": str(tmp_path), "COLUMNS": "200"}
    result = subprocess.run(
        [*DBLOOM, "relay", "--help"], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "Relay encrypted connections" in result.stdout
    assert "--max-circuits" in result.stdout and "--announce" in result.stdout


async def test_relay_listens_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DBLOOM_HOME": str(tmp_path),
        "DBLOOM_CONFIG": "",
        "PYTHONUNBUFFERED": "1",
    }
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            lambda task_status: trio.run_process(  # noqa: ASYNC105
                [*DBLOOM, "relay", "--listen", "/ip4/127.0.0.1/tcp/0"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                check=False,
                task_status=task_status,
            )
        )
        assert proc.stdout is not None and proc.stderr is not None
        out = b""
        with trio.fail_after(30):
            while b"relaying for up to" not in out:
                chunk = await proc.stdout.receive_some()
                assert chunk, f"relay exited early: {out!r} {await proc.stderr.receive_some()!r}"
                out += chunk
        listening = [line for line in out.decode().splitlines() if "listening on" in line]
        assert len(listening) == 1
        assert listening[0].startswith("listening on /ip4/127.0.0.1/tcp/")
        assert "/p2p/12D3KooW" in listening[0]
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(15):
            await proc.wait()
        assert proc.returncode == 0


async def test_relay_shim_says_it_sees_plaintext(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DBLOOM_HOME": str(tmp_path),
        "DBLOOM_CONFIG": "",
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "400",
    }
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            lambda task_status: trio.run_process(  # noqa: ASYNC105
                [
                    *DBLOOM,
                    "relay",
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                    "--shim",
                    "--shim-port",
                    "0",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                check=False,
                task_status=task_status,
            )
        )
        assert proc.stdout is not None
        out = b""
        with trio.fail_after(30):
            while b"relaying for up to" not in out:
                chunk = await proc.stdout.receive_some()
                assert chunk, f"relay exited early: {out!r}"
                out += chunk
        text = out.decode()
        api = next(line for line in text.splitlines() if "OpenAI-compatible API on" in line)
        assert "sees its prompts and outputs in plaintext" in api
        base_url = api.split("OpenAI-compatible API on ")[1].split()[0]
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as c:
            listed = await c.models.list()
        assert listed.data == []
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(15):
            await proc.wait()
        assert proc.returncode == 0
