"""`dbloom peer` and `dbloom shim` as an operator and an app developer run them.

Real processes on loopback: a bootstrap peer, a serving peer with a generated model, a
shim, and the official `openai` client; then Ctrl-C, and both exit 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import openai
import pytest
import trio

from dbloom.inference import build_tiny_model

DBLOOM = [sys.executable, "-m", "dbloom.cli"]


async def start(args: list[str], home: Path, nursery: trio.Nursery, **env: str) -> trio.Process:
    environment = {
        **os.environ,
        "DBLOOM_HOME": str(home),
        "DBLOOM_CONFIG": "",
        **env,
    }
    run = partial(
        trio.run_process,
        [*DBLOOM, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
        check=False,
    )
    return await nursery.start(run)


async def read_until(proc: trio.Process, marker: str, timeout: float = 90) -> str:
    """Stdout up to and including the first line containing `marker`."""
    assert proc.stdout is not None
    text = ""
    with trio.fail_after(timeout):
        while marker not in text:
            chunk = await proc.stdout.receive_some()
            if not chunk:
                err = await proc.stderr.receive_some() if proc.stderr else b""
                raise AssertionError(f"exited before {marker!r}: {text}{err.decode()}")
            text += chunk.decode()
    return text


def line_with(text: str, marker: str) -> str:
    return next(line for line in text.splitlines() if marker in line)


@pytest.mark.slow
async def test_peer_and_shim_processes_answer_an_openai_client(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny", size="tiny", seed=0)
    async with trio.open_nursery() as nursery:
        boot = await start(
            ["p2p", "serve", "-l", "/ip4/127.0.0.1/tcp/0"], tmp_path / "boot", nursery
        )
        boot_addr = line_with(await read_until(boot, "listening on"), "listening on").split()[-1]
        peer = await start(
            [
                "peer",
                "-l",
                "/ip4/127.0.0.1/tcp/0",
                "-b",
                boot_addr,
                "--no-benchmark",
                "--always-on",
                "--price-out",
                "0.5",
            ],
            tmp_path / "peer",
            nursery,
            DBLOOM_MODEL=str(model),
        )
        out = await read_until(peer, "attestation dev")
        assert "listening on /ip4/127.0.0.1/tcp/" in out and "/p2p/12D3KooW" in out
        assert "serving tiny" in out and "0.5 out per 1M" in out
        shim = await start(
            ["shim", "--port", "0", "--allow-dev", "-b", boot_addr], tmp_path / "shim", nursery
        )
        out = await read_until(shim, "/v1")
        base_url = line_with(out, "OpenAI-compatible API on").split()[-1]
        assert base_url.startswith("http://127.0.0.1:")

        def ask() -> str:
            client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
            reply = client.completions.create(model="tiny", prompt="hi", max_tokens=5)
            return reply.choices[0].text

        assert isinstance(await trio.to_thread.run_sync(ask), str)
        for proc in (shim, peer, boot):
            proc.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            for proc in (shim, peer, boot):
                await proc.wait()
        assert [p.returncode for p in (shim, peer, boot)] == [0, 0, 0]


def run_cli(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "DBLOOM_HOME": str(home), **env}
    return subprocess.run(
        [*DBLOOM, *args], capture_output=True, text=True, timeout=60, env=environment
    )


def test_peer_refuses_bad_options_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    env = {"DBLOOM_CONFIG": str(config)}
    result = run_cli("peer", home=tmp_path, **env)
    assert result.returncode == 1 and "nothing to serve" in result.stderr
    result = run_cli("peer", "-m", "x", "--price-in", "cheap", home=tmp_path, **env)
    assert result.returncode == 1 and "not a decimal" in result.stderr
    result = run_cli("peer", "-m", "x", "-l", "/ip4/nonsense", home=tmp_path, **env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    result = run_cli("peer", "-m", str(tmp_path / "missing"), home=tmp_path, **env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    config.write_text('[peer]\nmodle = ["x"]\n')
    result = run_cli("peer", home=tmp_path, **env)
    assert result.returncode == 1 and "has no option modle" in result.stderr
    config.write_text("[peer\n")
    result = run_cli("peer", home=tmp_path, **env)
    assert result.returncode == 1 and "not valid TOML" in result.stderr


def test_config_file_supplies_defaults_and_flags_win(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[peer]\nprice_in = "bogus"\n')
    env = {"DBLOOM_CONFIG": str(config)}
    result = run_cli("peer", "-m", "x", home=tmp_path, **env)
    assert result.returncode == 1 and "'bogus' is not a decimal" in result.stderr
    result = run_cli("peer", "-m", "x", "--price-in", "nope", home=tmp_path, **env)
    assert "'nope' is not a decimal" in result.stderr


def test_shim_refuses_a_public_bind_without_keys(tmp_path: Path) -> None:
    result = run_cli("shim", "--host", "0.0.0.0", "--port", "0", home=tmp_path)
    assert result.returncode == 1
    assert "requires API keys" in result.stderr and "dbloom shim keys add" in result.stderr
