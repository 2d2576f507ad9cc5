"""`dbloom attest log`: run a transparency log of allowed measurements and check its proofs.

The operator of a log adds the measurements of the builds it vouches for and serves the
log read-only over HTTP, so nodes fetch their inclusion proofs and monitors fetch tree
heads and consistency proofs; `verify` is what a client does with a node's proof.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn, TypeGuard

import trio
import typer
from hypercorn.config import Config
from hypercorn.trio import serve
from rich.markup import escape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dbloom.cli._common import console, err_console, run

from ._tlog import LogError, TransparencyLog, check_log_proof, read_bundle_file

log_app = typer.Typer(
    help="The transparency log of allowed software measurements.", no_args_is_help=True
)

LogFolder = Annotated[Path, typer.Argument(help="Folder of the log.")]
MeasurementHex = Annotated[str, typer.Argument(help="The measurement, 64 hex digits.")]


@log_app.command("init")
def init(folder: Annotated[Path, typer.Argument(help="Folder for the new log.")]) -> None:
    """Create a log and its signing key (mode 0600); refuses to overwrite a log."""
    try:
        log = TransparencyLog.init(folder)
    except (LogError, OSError) as exc:
        _fail(exc)
    console.print(f"created a transparency log in {escape(str(folder))}")
    console.print(f"log key {log.public_key.hex()}")


@log_app.command("add")
def add(
    folder: LogFolder,
    measurement_hex: MeasurementHex,
    note: Annotated[str, typer.Option(help="What this measurement is, for auditors.")] = "",
) -> None:
    """Publish a measurement; adding one already logged keeps its entry."""
    measurement = _hex32_or_fail(measurement_hex, "measurement")
    log = _open(folder)
    known = log.index_of(measurement) is not None
    try:
        index = log.add(measurement, note)
    except (LogError, OSError, ValueError) as exc:
        _fail(exc)
    console.print(f"entry {index}, tree size {len(log)}" + (" (already logged)" if known else ""))


@log_app.command("prove")
def prove(
    folder: LogFolder,
    measurement_hex: MeasurementHex,
    out: Annotated[Path, typer.Option(help="File to write the inclusion proof to.")],
) -> None:
    """Write the inclusion proof a node ships with its evidence."""
    measurement = _hex32_or_fail(measurement_hex, "measurement")
    try:
        bundle = _open(folder).inclusion_bundle(measurement)
        out.write_bytes(bundle.encode())
    except (LogError, OSError) as exc:
        _fail(exc)
    console.print(
        f"wrote the inclusion proof of entry {bundle.index} (tree size {bundle.sth.size}) "
        f"to {escape(str(out))}"
    )


@log_app.command("verify")
def verify(
    bundle_file: Annotated[Path, typer.Argument(help="An inclusion proof written by `prove`.")],
    measurement_hex: Annotated[
        str, typer.Option("--measurement", help="The measurement, 64 hex digits.")
    ],
    log_keys: Annotated[
        list[str], typer.Option("--log-key", help="A trusted log key in hex (repeatable).")
    ],
) -> None:
    """Check a proof as a client would; exit code 1 when it is refused."""
    measurement = _hex32_or_fail(measurement_hex, "measurement")
    keys = [_hex32_or_fail(key, "log key") for key in log_keys]
    try:
        raw = read_bundle_file(bundle_file)
    except (OSError, LogError) as exc:
        _fail(exc)
    refusals = check_log_proof(raw, measurement, keys)
    for refusal in refusals:
        console.print(f"refused: {escape(str(refusal))}")
    if refusals:
        raise typer.Exit(1)
    console.print("OK")


@log_app.command("serve")
def serve_command(
    folder: LogFolder,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port to listen on.")] = 8700,
) -> None:
    """Serve the log read-only over HTTP: tree heads, inclusion and consistency proofs."""
    run(_serve_and_report, _open(folder), host, port)


async def _serve_and_report(log: TransparencyLog, host: str, port: int) -> None:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_log, log, host, port)
        console.print(f"transparency log on {escape(url)}")


async def serve_log(
    log: TransparencyLog,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `log` over HTTP until cancelled; reports the API's base URL once listening."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.loglevel = "WARNING"
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(serve, log_api(log), config)
        task_status.started(f"{binds[0]}/v1")


def log_api(log: TransparencyLog) -> Starlette:
    """The read-only HTTP API of `log`; every request first reads what `add` appended."""
    lock = trio.Lock()

    async def sth(request: Request) -> Response:
        async with lock:
            await trio.to_thread.run_sync(log.refresh)
            head = log.head()
        return JSONResponse(
            {
                "size": head.size,
                "root": head.root.hex(),
                "timestamp_ms": head.timestamp_ms,
                "signature": head.signature.hex(),
                "key": log.public_key.hex(),
            }
        )

    async def inclusion(request: Request) -> Response:
        try:
            measurement = _hex32(request.path_params["measurement_hex"], "measurement")
        except ValueError as exc:
            return _error(400, str(exc))
        async with lock:
            await trio.to_thread.run_sync(log.refresh)
            if log.index_of(measurement) is None:
                return _error(404, f"measurement {measurement.hex()} is not in the log")
            bundle = log.inclusion_bundle(measurement)
        return Response(bundle.encode(), media_type="application/msgpack")

    async def consistency(request: Request) -> Response:
        first, second = request.query_params.get("first"), request.query_params.get("second")
        if not _is_count(first) or not _is_count(second):
            return _error(400, "first and second must be tree sizes (decimal integers)")
        async with lock:
            await trio.to_thread.run_sync(log.refresh)
            try:
                proof = log.consistency_proof(int(first), int(second))
            except ValueError as exc:
                return _error(400, str(exc))
        return JSONResponse([node.hex() for node in proof])

    return Starlette(
        routes=[
            Route("/v1/sth", sth, methods=["GET"]),
            Route("/v1/inclusion/{measurement_hex}", inclusion, methods=["GET"]),
            Route("/v1/consistency", consistency, methods=["GET"]),
        ]
    )


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def _is_count(text: str | None) -> TypeGuard[str]:
    return text is not None and text.isascii() and text.isdigit() and len(text) <= 20


def _hex32(text: str, what: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != 32:
        raise ValueError(f"{what} must be 64 hex digits (32 bytes), not {text!r}")
    return value


def _hex32_or_fail(text: str, what: str) -> bytes:
    try:
        return _hex32(text, what)
    except ValueError as exc:
        _fail(exc)


def _open(folder: Path) -> TransparencyLog:
    try:
        return TransparencyLog.open(folder)
    except (LogError, OSError) as exc:
        _fail(exc)


def _fail(exc: Exception) -> NoReturn:
    """`cli._common.fail` for an exception (spelled out: mypy checks attest/ without cli/)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        message = f"{exc.filename}: {exc.strerror}"
    else:
        message = str(exc)
    err_console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(1)
