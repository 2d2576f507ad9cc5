"""`dbloom peer` owner controls, `--dry-run`, and `dbloom status` on a running peer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
import trio

from dbloom.inference import build_tiny_model, model_digest
from dbloom.p2p import KeyPair, open_host
from dbloom.p2p.kad import KadConfig, KademliaDHT

DBLOOM = [sys.executable, "-m", "dbloom.cli"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


def dbloom(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "DBLOOM_HOME": str(home),
        "DBLOOM_CONFIG": "",
        **env,
    }
    return subprocess.run(
        [*DBLOOM, *args], capture_output=True, text=True, timeout=120, env=environment
    )


def one_line_error(done: subprocess.CompletedProcess[str], text: str) -> None:
    assert done.returncode == 1, done.stdout
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert text in done.stderr and "Traceback" not in done.stderr


def test_dry_run_prints_what_would_be_announced_and_touches_nothing(
    model: Path, tmp_path: Path
) -> None:
    done = dbloom(
        "peer", "-m", str(model), "--dry-run", "--price-out", "0.5", "--always-on", home=tmp_path
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "(new: no key yet, none is written by a dry run)" in out
    assert f"digest {model_digest(model)}" in out
    assert "context 2048 tokens" in out and "price 0 in, 0.5 out per 1M tokens" in out
    assert "attestation   dev" in out and "would serve now" in out and "always on" in out
    record = json.loads(out[out.index("{") : out.rindex("}") + 1])
    assert record["models"][0]["id"] == "tiny" and record["models"][0]["out"] == 500_000
    assert record["draining"] is False and record["attest"] == "dev"
    assert record["addrs"][0] == "/ip4/127.0.0.1/tcp/4001"
    assert out.rstrip().endswith("dry run: nothing was loaded, listened on or announced")
    assert not tmp_path.joinpath("identity.key").exists()
    assert not tmp_path.joinpath("peer-status.json").exists()


def test_dry_run_says_why_it_would_pause(model: Path, tmp_path: Path) -> None:
    later = datetime.now() + timedelta(hours=2)
    window = f"{later:%H}:00-{(later + timedelta(hours=1)):%H}:00"
    done = dbloom("peer", "-m", str(model), "--dry-run", "--hours", window, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "would pause now" in done.stdout
    assert f"✗ outside serving hours {window}" in done.stdout
    record = json.loads(done.stdout[done.stdout.index("{") : done.stdout.rindex("}") + 1])
    assert record["draining"] is True


def test_bad_owner_controls_are_one_line_errors(model: Path, tmp_path: Path) -> None:
    one_line_error(
        dbloom("peer", "-m", str(model), "--hours", "25:00-07:00", home=tmp_path),
        "--hours '25:00-07:00': 25:00 is not a time of day",
    )
    one_line_error(
        dbloom("peer", "-m", str(model), "--hours", "nights", home=tmp_path),
        "is not a range like 22:00-07:00",
    )
    one_line_error(
        dbloom("peer", "-m", str(model), "--dry-run", "--max-memory", "0.01", home=tmp_path),
        "GiB, above the 0.01 GiB the owner allows (max_memory)",
    )
    config = tmp_path / "config.toml"
    config.write_text('[peer]\nhours = "22:00"\nidle_minutes = 10\n')
    one_line_error(
        dbloom("peer", "-m", str(model), home=tmp_path, DBLOOM_CONFIG=str(config)),
        "--hours '22:00'",
    )


def test_status_without_a_peer_is_one_line(tmp_path: Path) -> None:
    one_line_error(dbloom("status", home=tmp_path), "no peer status at")


@pytest.mark.slow
async def test_status_shows_the_running_peer(model: Path, tmp_path: Path) -> None:
    async with (
        open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"]) as boot,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(KademliaDHT(boot, KadConfig()).run)
        run = partial(
            trio.run_process,
            [
                *DBLOOM,
                "peer",
                "-m",
                str(model),
                "-l",
                "/ip4/127.0.0.1/tcp/0",
                "-b",
                str(boot.listen_addrs[0]),
                "--no-benchmark",
                "--always-on",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={
                **os.environ,
                "DBLOOM_HOME": str(tmp_path),
                "DBLOOM_CONFIG": "",
            },
            check=False,
        )
        peer = await nursery.start(run)
        assert peer.stdout is not None
        text = ""
        with trio.fail_after(90):
            while "attestation dev" not in text:
                text += (await peer.stdout.receive_some()).decode()
        assert "availability: serving" in text
        status = await trio.to_thread.run_sync(partial(dbloom, "status", home=tmp_path))
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert lines[0].startswith("peer") and "12D3KooW" in lines[0]
        assert "state         serving" in lines and "availability  serving" in lines
        assert "              ✓ always on: conditions are not checked" in lines
        assert "served        0 requests, 0 tokens" in lines
        assert "earnings      0 this epoch (0 receipts)" in lines
        assert any(line.startswith("attestation   dev: evidence ok at start") for line in lines)
        raw = await trio.to_thread.run_sync(partial(dbloom, "status", "--json", home=tmp_path))
        assert json.loads(raw.stdout)["pid"] == peer.pid
        assert (tmp_path / "peer-status.json").stat().st_mode & 0o777 == 0o600
        peer.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            await peer.wait()
        assert peer.returncode == 0
        stopped = await trio.to_thread.run_sync(partial(dbloom, "status", home=tmp_path))
        assert stopped.returncode == 1 and stopped.stdout.startswith("not running")
        assert "state         stopped" in stopped.stdout.splitlines()
        nursery.cancel_scope.cancel()
