"""`dbloom peer`: serve models to the network, from one command.

By default a peer serves only while its owner is away: idle for `--idle-minutes`, on AC
power, thermally nominal, with memory to spare and inside `--hours` (see
`_availability.py`); `--always-on` drops every condition. `--dry-run` resolves and prints
everything the peer would announce, and the decision it would take now, then exits.
`--log-file` sends logs to a size-rotated file instead of stderr (what `dbloom service`
uses); logs carry request ids, counts and timings, never prompts or outputs.
`--reachability` says how peers reach this Mac: by default it asks relays to dial it
back and, behind a home NAT, holds slots on relays (printing `reachable at
…/p2p-circuit/…` once they are in its record); `private` skips the dial-backs and
`public` (a public IP or a port forward) uses no relays.
"""

from __future__ import annotations

import faulthandler
import io
import json
import logging
import logging.handlers
import os
from dataclasses import replace
from pathlib import Path

import msgpack
import trio
import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from dbloom.attest import (
    AppleHelperProvider,
    DevProvider,
    EvidenceProvider,
    TpmProvider,
    measure_software,
)
from dbloom.attest._apple_helper import HELPER
from dbloom.ledger._money import format_price, parse_price
from dbloom.p2p import (
    KEY_FILE_NAME,
    KeyPair,
    Multiaddr,
    MultiaddrError,
    load_identity,
    load_or_create_identity,
)

from ._availability import Availability, Hours, Rules, gib, parse_hours
from ._common import console, fail, home_dir, run, state
from ._node import (
    REACHABILITY_MODES,
    LogProofError,
    PeerNode,
    PeerSettings,
    ReachabilityMode,
    expand_addrs,
    read_log_proof,
)
from ._probes import read_all, system_probes
from .p2p import wait_for_interrupt
from .status import MARKS, status_path

LEDGER_FILE = Path("ledger") / "ledger.sqlite3"
ATTEST_KINDS = ("dev", "tpm2", "apple-app-attest", "apple-mda")
LOG_FILE_BYTES = 10 << 20
LOG_FILE_BACKUPS = 5
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-rotated log whose files only the owner can read."""

    def _open(self) -> io.TextIOWrapper:
        stream = super()._open()
        os.chmod(self.baseFilename, 0o600)
        return stream


def log_to_file(path: Path) -> None:
    """Send every log record to `path` (rotated by size) instead of stderr.

    INFO and up, DEBUG with `--debug`. Crashes still reach stderr: uncaught tracebacks and
    faulthandler's stack dump, which names code locations only, never data.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    handler = _PrivateRotatingFileHandler(
        path, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
    )
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if state.debug else logging.INFO)
    faulthandler.enable()


def evidence_provider(
    kind: str,
    identity: KeyPair,
    *,
    tpm_tcti: str,
    tpm_ak: str,
    tpm_ak_chain: list[Path],
    apple_helper: str,
) -> EvidenceProvider:
    """The evidence source for `--attest`."""
    if kind == "dev":
        return DevProvider(identity)
    if kind == "tpm2":
        if not tpm_ak_chain:
            fail("--attest tpm2 needs --tpm-ak-chain (the AK certificate, then intermediates)")
        return TpmProvider(tpm_tcti, tpm_ak, tpm_ak_chain)
    return AppleHelperProvider(kind, helper=apple_helper)


def peer(
    listen: list[str] = typer.Option(
        ["/ip4/0.0.0.0/tcp/4001"],
        "--listen",
        "-l",
        envvar="DBLOOM_LISTEN",
        help="Multiaddr to listen on (repeatable).",
    ),
    bootstrap: list[str] = typer.Option(
        [],
        "--bootstrap",
        "-b",
        envvar="DBLOOM_BOOTSTRAP",
        help="Peer to join through (repeatable).",
    ),
    model: list[str] = typer.Option(
        [],
        "--model",
        "-m",
        envvar="DBLOOM_MODEL",
        help="Model to serve: a local folder or a Hugging Face repo id (repeatable).",
    ),
    attest: str = typer.Option(
        "dev", "--attest", envvar="DBLOOM_ATTEST", help=f"Evidence kind: {', '.join(ATTEST_KINDS)}."
    ),
    price_in: str = typer.Option(
        "0", "--price-in", envvar="DBLOOM_PRICE_IN", help="Price per 1M input tokens."
    ),
    price_out: str = typer.Option(
        "0", "--price-out", envvar="DBLOOM_PRICE_OUT", help="Price per 1M output tokens."
    ),
    max_batch: int = typer.Option(
        8,
        "--max-batch",
        min=1,
        max=256,
        envvar="DBLOOM_MAX_BATCH",
        help="Requests decoded at once.",
    ),
    max_queue: int = typer.Option(
        16, "--max-queue", min=0, max=4096, envvar="DBLOOM_MAX_QUEUE", help="Requests waiting."
    ),
    drain_timeout: float = typer.Option(
        30.0,
        "--drain-timeout",
        min=0,
        help="Seconds running requests get to finish on Ctrl-C or a pause (then handed back).",
    ),
    log_proof: Path | None = typer.Option(
        None, "--log-proof", help="Transparency-log inclusion proof of this software (file)."
    ),
    benchmark: bool = typer.Option(
        True, "--benchmark/--no-benchmark", help="Measure tok/s at start to advertise."
    ),
    tpm_tcti: str = typer.Option(
        "device:/dev/tpmrm0", "--tpm-tcti", envvar="DBLOOM_TPM_TCTI", help="TPM for --attest tpm2."
    ),
    tpm_ak: str = typer.Option(
        "0x81000002", "--tpm-ak", help="Persistent handle of the certified attestation key."
    ),
    tpm_ak_chain: list[Path] = typer.Option(
        [], "--tpm-ak-chain", help="AK certificate, then intermediates (PEM or DER; repeatable)."
    ),
    apple_helper: str = typer.Option(
        HELPER,
        "--apple-helper",
        help="Signed helper app for the Apple kinds.",
    ),
    idle_minutes: float = typer.Option(
        5.0,
        "--idle-minutes",
        min=0,
        envvar="DBLOOM_IDLE_MINUTES",
        help="Serve after this many minutes without keyboard or mouse input (0: any time).",
    ),
    hours: str = typer.Option(
        "",
        "--hours",
        envvar="DBLOOM_HOURS",
        help="Serve only within these local hours, e.g. 22:00-07:00 (comma-separated).",
    ),
    serve_on_battery: bool = typer.Option(
        False, "--serve-on-battery/--no-serve-on-battery", help="Serve on battery power too."
    ),
    max_memory: float | None = typer.Option(
        None,
        "--max-memory",
        min=0,
        max=1 << 20,
        envvar="DBLOOM_MAX_MEMORY",
        help="Refuse models estimated to need more than this many GB (GiB) together.",
    ),
    always_on: bool = typer.Option(
        False,
        "--always-on/--no-always-on",
        envvar="DBLOOM_ALWAYS_ON",
        help="Serve whenever running: ignore idle time, power, heat, memory and hours.",
    ),
    reachability: str = typer.Option(
        "auto",
        "--reachability",
        envvar="DBLOOM_REACHABILITY",
        help="auto: ask relays to dial back, hold relay slots if behind NAT; "
        "private: hold relay slots without asking; public: no relays.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print what would be served and announced, then exit."
    ),
    log_file: Path | None = typer.Option(
        None, "--log-file", help="Log to this file (rotated by size) instead of stderr."
    ),
    home: Path | None = typer.Option(None, "--home", help="Home folder (identity key)."),
) -> None:
    """Serve models while this Mac is idle: announce them, answer attestation and inference."""
    if not model:
        fail("nothing to serve: pass --model FOLDER_OR_REPO (or set [peer] model in config.toml)")
    if attest not in ATTEST_KINDS:
        fail(f"--attest must be one of {', '.join(ATTEST_KINDS)}, not {attest!r}")
    reachability_mode = _reachability_mode(reachability)
    try:
        prices = parse_price(price_in), parse_price(price_out)
        for addr in [*listen, *bootstrap]:
            Multiaddr.parse(addr)
    except (ValueError, MultiaddrError) as e:
        fail(str(e))
    serving_hours: Hours | None = None
    if hours.strip():
        try:
            serving_hours = parse_hours(hours)
        except ValueError as e:
            fail(f"--hours {hours!r}: {e}")
    rules = Rules(
        idle_minutes=idle_minutes,
        hours=serving_hours,
        serve_on_battery=serve_on_battery,
        always_on=always_on,
    )
    home_path = home_dir(home)
    log_bundle = None
    if log_proof is not None:
        try:
            log_bundle = read_log_proof(log_proof, measure_software().digest)
        except LogProofError as e:
            fail(str(e))

    async def main() -> None:
        key_file = home_path / KEY_FILE_NAME
        if dry_run:
            identity = load_identity(key_file) if key_file.exists() else KeyPair.generate()
        else:
            if log_file is not None:
                log_to_file(log_file)
            identity = load_or_create_identity(key_file)
        settings = PeerSettings(
            listen=listen,
            bootstrap=bootstrap,
            models=model,
            attest=attest,
            price_in=prices[0],
            price_out=prices[1],
            max_batch=max_batch,
            max_queue=max_queue,
            drain_timeout=drain_timeout,
            benchmark=benchmark,
            log_proof=log_bundle,
            ledger=home_path / LEDGER_FILE,
            availability=rules,
            max_memory=None if max_memory is None else int(max_memory * 2**30),
            status_file=status_path(home_path),
            reachability=reachability_mode,
        )
        provider = evidence_provider(
            attest,
            identity,
            tpm_tcti=tpm_tcti,
            tpm_ak=tpm_ak,
            tpm_ak_chain=tpm_ak_chain,
            apple_helper=apple_helper,
        )
        node = PeerNode(identity, settings, provider=provider)
        if dry_run:
            await _dry_run(node, fresh_identity=not key_file.exists())
            return
        async with trio.open_nursery() as nursery:
            with console.status("starting: loading models, measuring speed, joining the DHT"):
                await nursery.start(node.run)
            assert node.host is not None
            for addr in announced_addrs(node):
                console.print(f"listening on {addr}")
            for offer in node.offers:
                console.print(
                    f"serving {offer.id}: {offer.decode_tps:.0f} tok/s decode, "
                    f"{offer.prefill_tps:.0f} tok/s prefill, "
                    f"{format_price(offer.price_in)} in, {format_price(offer.price_out)} out per 1M"
                )
            console.print(f"availability: {escape(node.decision.summary())}")
            console.print(
                f"attestation {node.provider.kind} ({node.attestation}); "
                "Ctrl-C stops announcing and drains"
            )
            async with trio.open_nursery() as ui:
                ui.start_soon(_status, node)
                await wait_for_interrupt()
                ui.cancel_scope.cancel()
            console.print("stopping: no new requests; finishing the running ones")
            node.request_stop()

    run(main)


def _reachability_mode(text: str) -> ReachabilityMode:
    for mode in REACHABILITY_MODES:
        if text == mode:
            return mode
    fail(f"--reachability must be one of {', '.join(REACHABILITY_MODES)}, not {text!r}")


def announced_addrs(node: PeerNode) -> list[str]:
    """Full multiaddrs (with /p2p/<id>) of every address we listen on."""
    assert node.host is not None
    return expand_addrs(map(str, node.host.listen_addrs))


def relayed_addrs(node: PeerNode) -> list[str]:
    """The circuit addresses in the record we last published: how peers behind relays
    reach us (printed once the record carries them, so they can be looked up)."""
    record = node.record
    return [a for a in record.addrs if "/p2p-circuit/" in a] if record is not None else []


def _table(node: PeerNode) -> Table:
    assert node.host is not None and node.pool is not None
    pool = node.pool
    table = Table(show_header=False, box=None)
    table.add_row("status", node.status)
    decision = node.decision
    table.add_row("availability", "serving" if decision.serve else "paused")
    for check in decision.checks:
        table.add_row("", escape(f"{MARKS[check.state]} {check.text}"))
    table.add_row("reachability", escape(node.reachability()))
    table.add_row("peers", str(node.host.num_connections))
    table.add_row("in flight", str(pool.in_flight))
    table.add_row("served", f"{pool.requests_total} requests, {pool.tokens_total} tokens")
    table.add_row("tok/s", f"{pool.tokens_per_second():.1f}")
    receipts, earned = node.earnings()
    table.add_row("earnings", f"{format_price(earned)} this epoch ({receipts} receipts)")
    table.add_row("attestation", escape(f"{node.provider.kind}: {node.attestation_status()}"))
    return table


async def _dry_run(node: PeerNode, *, fresh_identity: bool) -> None:
    """Everything `dbloom peer` would serve and announce, and whether it would serve now."""
    plan = await node.plan()
    settings = node.settings
    rules = settings.availability
    need = sum(m.memory for m in plan.models)
    decision = Availability(replace(rules, memory_need=need)).update(
        await read_all(system_probes()), trio.current_time()
    )
    new = " (new: no key yet, none is written by a dry run)" if fresh_identity else ""
    rows = [("peer", f"{node.peer_id}{new}"), ("listen", ", ".join(settings.listen))]
    for model, offer in zip(plan.models, plan.record.models, strict=True):
        rows += [
            ("model", f"{offer.id} at {model.path}"),
            ("", f"digest {offer.digest}"),
            ("", f"context {offer.context_length} tokens; needs about {gib(model.memory)}"),
            (
                "",
                f"price {format_price(offer.price_in)} in, "
                f"{format_price(offer.price_out)} out per 1M tokens",
            ),
        ]
    rows += [
        ("measurement", plan.record.measurement),
        ("attestation", node.provider.kind),
        ("reachability", settings.reachability),
        ("availability", "would serve now" if decision.serve else "would pause now"),
        *[("", f"{MARKS[c.state]} {c.text}") for c in decision.checks],
    ]
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        console.print(f"{label:<{width}}  {escape(text)}")
    record = replace(plan.record, draining=not decision.serve)
    body = msgpack.unpackb(record.encode())
    console.print("node record (tok/s are measured at start, not in a dry run):")
    console.print(json.dumps(body, indent=2), markup=False)
    console.print("dry run: nothing was loaded, listened on or announced")


async def _status(node: PeerNode) -> None:
    """A live table on a terminal; elsewhere (a pipe, a service's log) a line per change.

    Either way a line per relayed address that enters or leaves the published record.
    """
    relayed: list[str] = []

    def print_relayed() -> None:
        nonlocal relayed
        now = relayed_addrs(node)
        for addr in now:
            if addr not in relayed:
                console.print(f"reachable at {addr}")
        for addr in relayed:
            if addr not in now:
                console.print(f"no longer reachable at {addr}")
        relayed = now

    if not console.is_terminal:
        serving = node.decision.serve
        while True:
            await trio.sleep(0.5)
            print_relayed()
            if node.decision.serve != serving:
                serving = node.decision.serve
                console.print(f"availability: {escape(node.decision.summary())}")
    with Live(_table(node), console=console, refresh_per_second=2, transient=True) as live:
        while True:
            await trio.sleep(0.5)
            print_relayed()
            live.update(_table(node))
