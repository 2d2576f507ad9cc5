"""`dbloom attest log …` through typer, and the read-only HTTP API of `serve`."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import trio
from typer.testing import CliRunner

from dbloom.attest._merkle import verify_consistency as verify_merkle_consistency
from dbloom.attest._tlog import (
    SignedTreeHead,
    TransparencyLog,
    check_log_proof,
    verify_consistency,
)
from dbloom.attest._tlog_cli import log_app, serve_log

M = [hashlib.sha256(bytes([i])).hexdigest() for i in range(8)]
runner = CliRunner()


def cli(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(log_app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_init_add_prove_verify(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    code, out, _ = cli("init", folder)
    assert code == 0 and "created a transparency log" in out
    key = out.split()[-1]
    assert bytes.fromhex(key) == TransparencyLog.open(folder).public_key
    assert cli("add", folder, M[0], "--note", "release 1.0")[:2] == (0, "entry 0, tree size 1\n")
    assert cli("add", folder, M[1])[:2] == (0, "entry 1, tree size 2\n")
    assert cli("add", folder, M[0])[:2] == (0, "entry 0, tree size 2 (already logged)\n")
    bundle = tmp_path / "proof.msgpack"
    code, out, _ = cli("prove", folder, M[1], "--out", bundle)
    assert code == 0 and str(bundle) in out and "entry 1 (tree size 2)" in out
    assert check_log_proof(bundle.read_bytes(), bytes.fromhex(M[1]), [bytes.fromhex(key)]) == []
    code, out, _ = cli("verify", bundle, "--measurement", M[1], "--log-key", key)
    assert (code, out) == (0, "OK\n")
    other = "11" * 32
    code, out, _ = cli(
        "verify", bundle, "--measurement", M[1], "--log-key", other, "--log-key", key
    )
    assert (code, out) == (0, "OK\n")


def test_verify_refusals_exit_1(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    key = cli("init", folder)[1].split()[-1]
    cli("add", folder, M[0])
    bundle = tmp_path / "proof.msgpack"
    cli("prove", folder, M[0], "--out", bundle)
    code, out, _ = cli("verify", bundle, "--measurement", M[2], "--log-key", key)
    assert code == 1 and out.startswith("refused: measurement-not-logged")
    code, out, _ = cli("verify", bundle, "--measurement", M[0], "--log-key", "22" * 32)
    assert code == 1 and out.startswith("refused: bad-log-signature")
    bundle.write_bytes(bundle.read_bytes()[:-3])
    code, out, _ = cli("verify", bundle, "--measurement", M[0], "--log-key", key)
    assert code == 1 and out.startswith("refused: malformed-evidence")


def test_mistakes_give_one_line_and_exit_1(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    cli("init", folder)
    missing = tmp_path / "missing"
    cases = [
        (("init", folder), "already exists"),
        (("add", folder, "abc"), "64 hex digits"),
        (("add", missing, M[0]), "no transparency log"),
        (("prove", folder, M[5], "--out", tmp_path / "p"), "not in the log"),
        (("prove", missing, M[5], "--out", tmp_path / "p"), "no transparency log"),
        (("verify", tmp_path / "nope", "--measurement", M[0], "--log-key", M[1]), "nope"),
        (("verify", tmp_path / "nope", "--measurement", M[0], "--log-key", "zz"), "log key"),
        (("serve", missing), "no transparency log"),
    ]
    for args, needle in cases:
        code, out, err = cli(*args)
        assert code == 1, (args, out, err)
        assert needle in err and len(err.strip().splitlines()) == 1, (args, err)


def test_add_keeps_a_last_entry_whose_newline_was_stripped(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    cli("init", folder)
    cli("add", folder, M[0])
    cli("add", folder, M[1])
    entries = folder / "entries.jsonl"
    entries.write_bytes(entries.read_bytes().rstrip(b"\n"))
    assert cli("add", folder, M[2])[:2] == (0, "entry 2, tree size 3\n")
    lines = entries.read_text().splitlines()
    assert [json.loads(line)["measurement"] for line in lines] == M[:3]


def test_a_deeply_nested_entry_is_reported_as_corruption(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    cli("init", folder)
    cli("add", folder, M[0])
    with (folder / "entries.jsonl").open("ab") as entries:
        entries.write(b"[" * 100_000 + b"\n")
    for args in (("add", folder, M[1]), ("prove", folder, M[0], "--out", tmp_path / "p")):
        code, _, err = cli(*args)
        assert code == 1 and "entry 1 is unreadable" in err and "corrupted" in err
        assert len(err.strip().splitlines()) == 1


def test_serve_reports_a_busy_port(tmp_path: Path) -> None:
    cli("init", tmp_path / "log")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = cli("serve", tmp_path / "log", "--port", str(port))
    assert code == 1 and "address already in use" in err.lower()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["content-type"], error.read()


def _sth(body: bytes) -> tuple[SignedTreeHead, bytes]:
    data = json.loads(body)
    sth = SignedTreeHead(
        data["size"],
        bytes.fromhex(data["root"]),
        data["timestamp_ms"],
        bytes.fromhex(data["signature"]),
    )
    return sth, bytes.fromhex(data["key"])


async def test_http_api(tmp_path: Path) -> None:
    log = TransparencyLog.init(tmp_path / "log")
    for measurement in M[:3]:
        log.add(bytes.fromhex(measurement))
    writer = TransparencyLog.open(tmp_path / "log")

    async def get(path: str) -> tuple[int, str, bytes]:
        return await trio.to_thread.run_sync(_get, base + path)

    async with trio.open_nursery() as nursery:
        base = await nursery.start(serve_log, log, "127.0.0.1", 0)
        assert base.startswith("http://127.0.0.1:") and base.endswith("/v1")

        status, kind, body = await get("/sth")
        assert (status, kind) == (200, "application/json")
        first, key = _sth(body)
        assert first.size == 3 and first.verify(key) and key == log.public_key

        status, kind, body = await get(f"/inclusion/{M[1]}")
        assert (status, kind) == (200, "application/msgpack")
        assert check_log_proof(body, bytes.fromhex(M[1]), [key]) == []

        # Entries another process adds show up without restarting the server.
        for measurement in M[3:7]:
            writer.add(bytes.fromhex(measurement))
        second, _ = _sth((await get("/sth"))[2])
        assert second.size == 7
        status, _, body = await get(f"/inclusion/{M[6]}")
        assert status == 200 and check_log_proof(body, bytes.fromhex(M[6]), [key]) == []

        status, kind, body = await get("/consistency?first=3&second=7")
        assert (status, kind) == (200, "application/json")
        proof = [bytes.fromhex(h) for h in json.loads(body)]
        assert verify_consistency(first, second, proof, key) == []
        status, _, body = await get("/consistency?first=0&second=7")
        assert (status, json.loads(body)) == (200, [])
        status, _, body = await get("/consistency?first=7&second=7")
        assert verify_merkle_consistency(7, 7, second.root, second.root, json.loads(body))

        status, kind, body = await get(f"/inclusion/{M[7]}")
        assert (status, kind) == (404, "application/json") and "not in the log" in body.decode()
        for bad in ("zz", M[0][:-2], M[0] + "00"):
            status, _, body = await get(f"/inclusion/{bad}")
            assert status == 400 and "64 hex digits" in json.loads(body)["error"]
        for query in (
            "first=4&second=3",
            "first=1&second=8",
            "first=a&second=2",
            "first=-1&second=2",
            "first=1",
            "",
        ):
            status, kind, body = await get(f"/consistency?{query}")
            assert (status, kind) == (400, "application/json"), query
            assert json.loads(body)["error"]
        assert (await get("/nothing"))[0] == 404
        nursery.cancel_scope.cancel()


async def test_serve_command_prints_where_it_listens(tmp_path: Path) -> None:
    log = TransparencyLog.init(tmp_path / "log")
    log.add(bytes.fromhex(M[0]))
    script = "from dbloom.attest._tlog_cli import log_app; log_app()"
    command = [sys.executable, "-c", script, "serve", str(tmp_path / "log"), "--port", "0"]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    try:
        output = b""
        with trio.fail_after(30):
            while not output.endswith(b"\n"):
                output += await process.stdout.receive_some()
        line = output.decode().strip()
        assert line.startswith("transparency log on http://127.0.0.1:") and line.endswith("/v1")
        status, _, body = await trio.to_thread.run_sync(_get, line.split()[-1] + "/sth")
        assert status == 200 and json.loads(body)["size"] == 1
    finally:
        process.terminate()
        await process.wait()
        await process.stdout.aclose()


def test_hostile_text_is_printed_not_interpreted(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    key = cli("init", folder)[1].split()[-1]
    code, _, err = cli("add", folder, "[/red]")
    assert code == 1 and "'[/red]'" in err
    cli("add", folder, M[0])
    bundle = tmp_path / "hostile.msgpack"
    cli("prove", folder, M[0], "--out", bundle)
    bundle.write_bytes(msgpack.packb({**msgpack.unpackb(bundle.read_bytes()), "[/bold]": 1}))
    code, out, _ = cli("verify", bundle, "--measurement", M[0], "--log-key", key)
    assert code == 1 and "[/bold]" in out
