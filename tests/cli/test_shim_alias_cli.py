"""`dbloom shim --alias` and `--require-key` as an app developer runs them.

Real processes on loopback: a bootstrap peer, a serving peer with a generated model, and a
shim that calls it `gpt-3` and wants a key; then the app's `requests` code, unchanged but
for its URL and key.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import requests
import trio

from dbloom.inference import build_tiny_model

DBLOOM = [sys.executable, "-m", "dbloom.cli"]


def environment(home: Path, **env: str) -> dict[str, str]:
    return {**os.environ, "DBLOOM_HOME": str(home), "DBLOOM_CONFIG": "", **env}


async def start(args: list[str], home: Path, nursery: trio.Nursery, **env: str) -> trio.Process:
    run = partial(
        trio.run_process,
        [*DBLOOM, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(home, **env),
        check=False,
    )
    return await nursery.start(run)


async def read_until(proc: trio.Process, marker: str, timeout: float = 90) -> str:
    """Stdout up to and including the first line containing `marker`."""
    assert proc.stdout is not None
    text = ""
    with trio.fail_after(timeout):
        while marker not in text.rpartition("\n")[0]:
            chunk = await proc.stdout.receive_some()
            if not chunk:
                err = await proc.stderr.receive_some() if proc.stderr else b""
                raise AssertionError(f"exited before {marker!r}: {text}{err.decode()}")
            text += chunk.decode()
    return text


def last_word(text: str, marker: str) -> str:
    return next(line for line in text.splitlines() if marker in line).split()[-1]


def run_cli(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DBLOOM, *args], capture_output=True, text=True, timeout=60, env=environment(home, **env)
    )


@pytest.mark.slow
async def test_shim_alias_with_a_required_key_answers_the_example(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny", size="tiny", seed=0)
    created = run_cli("shim", "keys", "add", "app", home=tmp_path / "shim")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    async with trio.open_nursery() as nursery:
        boot = await start(
            ["p2p", "serve", "-l", "/ip4/127.0.0.1/tcp/0"], tmp_path / "boot", nursery
        )
        boot_addr = last_word(await read_until(boot, "listening on"), "listening on")
        peer = await start(
            [
                "peer",
                "-l",
                "/ip4/127.0.0.1/tcp/0",
                "-b",
                boot_addr,
                "--no-benchmark",
                "--always-on",
            ],
            tmp_path / "peer",
            nursery,
            DBLOOM_MODEL=str(model),
        )
        await read_until(peer, "attestation dev")
        shim = await start(
            [
                "shim",
                "--port",
                "0",
                "--allow-dev",
                "-b",
                boot_addr,
                "--alias",
                "gpt-3=tiny",
                "--require-key",
            ],
            tmp_path / "shim",
            nursery,
        )
        out = await read_until(shim, "model alias")
        assert "model alias gpt-3 -> tiny" in out
        URL, KEY = last_word(out, "Anthropic-compatible API on"), key  # the example's names
        assert URL.startswith("http://127.0.0.1:")

        def example() -> str:
            text: str = requests.post(
                URL + "/v1/completions",
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                json={
                    "model": "gpt-3",
                    "prompt": "Explain how decentralized AI inference improves privacy.",
                    "max_tokens": 128,
                },
            ).json()["choices"][0]["text"]
            return text

        def without_key() -> int:
            body = {"model": "gpt-3", "prompt": "hi", "max_tokens": 2}
            return requests.post(URL + "/v1/completions", json=body).status_code

        assert isinstance(await trio.to_thread.run_sync(example), str)
        assert await trio.to_thread.run_sync(without_key) == 401
        for proc in (shim, peer, boot):
            proc.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            for proc in (shim, peer, boot):
                await proc.wait()
        assert [p.returncode for p in (shim, peer, boot)] == [0, 0, 0]


def assert_one_line_error(result: subprocess.CompletedProcess[str], words: str) -> None:
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    assert words in result.stderr


def test_bad_alias_is_one_line(tmp_path: Path) -> None:
    result = run_cli("shim", "--port", "0", "--alias", "gpt-3", home=tmp_path)
    assert_one_line_error(result, "alias 'gpt-3' is not NAME=MODEL (e.g. gpt-3=tiny)")
    result = run_cli("shim", "--alias", "a=b", "--alias", "b=tiny", home=tmp_path)
    assert_one_line_error(result, "alias 'a' points to another alias, 'b'")


def test_aliases_and_require_key_from_config_toml(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    env = {"DBLOOM_CONFIG": str(config)}
    config.write_text('[shim]\nalias = ["gpt-3"]\n')
    result = run_cli("shim", "--port", "0", home=tmp_path, **env)
    assert_one_line_error(result, "alias 'gpt-3' is not NAME=MODEL")
    config.write_text('[shim]\nalias = ["gpt-3=tiny"]\nrequire_key = true\n')
    result = run_cli("shim", "--port", "0", home=tmp_path, **env)
    assert_one_line_error(result, "--require-key needs an API key: run `dbloom shim keys add NAME`")
