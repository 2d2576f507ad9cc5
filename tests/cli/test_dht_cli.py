"""`dbloom dht …` and `dbloom p2p serve --dht` as an operator runs them, on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

DBLOOM = [sys.executable, "-m", "dbloom.cli"]


def env_for(home: Path) -> dict[str, str]:
    return {**os.environ, "DBLOOM_HOME": str(home), "PYTHONUNBUFFERED": "1"}


async def dbloom(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [*DBLOOM, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env_for(home),
        )


@asynccontextmanager
async def serving(home: Path, *extra: str) -> AsyncIterator[str]:
    """A `dbloom p2p serve --dht server` process; yields its address."""
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            lambda task_status: trio.run_process(  # noqa: ASYNC105
                [
                    *DBLOOM,
                    "p2p",
                    "serve",
                    "--listen",
                    "/ip4/127.0.0.1/tcp/0",
                    "--dht",
                    "server",
                    *extra,
                ],
                stdout=subprocess.PIPE,
                env=env_for(home),
                check=False,
                task_status=task_status,
            )
        )
        assert proc.stdout is not None
        buffer = b""
        with trio.fail_after(30):
            while b"DHT server mode" not in buffer:
                buffer += await proc.stdout.receive_some()
        address = buffer.decode().splitlines()[0].removeprefix("listening on ")
        try:
            yield address
        finally:
            proc.send_signal(2)
            with trio.fail_after(15):
                await proc.wait()
            assert proc.returncode == 0
            assert (home / "routing-table.json").exists()


async def test_provide_find_put_get(tmp_path: Path) -> None:
    async with serving(tmp_path / "a") as first, serving(tmp_path / "b", "--bootstrap", first):
        provided = await dbloom(
            tmp_path / "c", "dht", "provide", "dbloom:model:tiny", "--once", "-b", first
        )
        assert provided.returncode == 0, provided.stderr
        provider = provided.stdout.decode().split()[0]
        assert provider.startswith("12D3KooW") and "stored at 2 peers" in provided.stdout.decode()

        found = await dbloom(
            tmp_path / "d", "dht", "find-providers", "dbloom:model:tiny", "-b", first
        )
        assert found.returncode == 0, found.stderr
        assert provider in found.stdout.decode() and "1 provider(s)" in found.stdout.decode()

        value_file = tmp_path / "value.bin"
        value_file.write_bytes(b"capabilities")
        key = f"/dbloom/node/{provider}"
        put = await dbloom(
            tmp_path / "c", "dht", "put", key, str(value_file), "--sign", "-b", first
        )
        assert put.returncode == 0, put.stderr
        got = await dbloom(tmp_path / "d", "dht", "get", key, "-b", first)
        assert got.returncode == 0, got.stderr
        text = got.stdout.decode()
        assert f"node record of {provider}" in text and b"capabilities".hex() in text

        missing = await dbloom(
            tmp_path / "d",
            "dht",
            "get",
            "/dbloom/node/12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq",
            "-b",
            first,
        )
        assert missing.returncode == 1 and b"no value found" in missing.stderr

        nobody = await dbloom(
            tmp_path / "d", "dht", "find-providers", "dbloom:model:none", "-b", first
        )
        assert nobody.returncode == 1 and b"0 provider(s)" in nobody.stdout


async def test_bad_input_gives_one_line(tmp_path: Path) -> None:
    no_bootstrap = await dbloom(tmp_path, "dht", "find-providers", "x")
    assert no_bootstrap.returncode == 1 and b"--bootstrap" in no_bootstrap.stderr
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 70_000)
    too_big = await dbloom(
        tmp_path, "dht", "put", "/dbloom/node/x", str(big), "-b", "/ip4/127.0.0.1/tcp/1"
    )
    assert too_big.returncode == 1 and b"at most 65536" in too_big.stderr
    bad_mode = await dbloom(tmp_path, "p2p", "serve", "--dht", "sometimes")
    assert bad_mode.returncode == 1 and b"--dht must be" in bad_mode.stderr
    for result in (no_bootstrap, too_big, bad_mode):
        assert b"Traceback" not in result.stderr
