"""`dbloom peer`: serve models to the network, from one command."""

from __future__ import annotations

from pathlib import Path

import trio
import typer
from rich.live import Live
from rich.table import Table

from dbloom.attest import AppleHelperProvider, DevProvider, EvidenceProvider, TpmProvider
from dbloom.attest._apple_helper import HELPER
from dbloom.ledger._money import format_price, parse_price
from dbloom.p2p import KEY_FILE_NAME, KeyPair, Multiaddr, MultiaddrError, load_or_create_identity

from ._common import console, fail, home_dir, run
from ._node import PeerNode, PeerSettings, advertised_addrs
from .p2p import wait_for_interrupt

LEDGER_FILE = Path("ledger") / "ledger.sqlite3"
ATTEST_KINDS = ("dev", "tpm2", "apple-app-attest", "apple-mda")


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
        30.0, "--drain-timeout", min=0, help="Seconds to let running requests finish on Ctrl-C."
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
    home: Path | None = typer.Option(None, "--home", help="Home folder (identity key)."),
) -> None:
    """Serve models: announce them in the DHT, answer attestation and inference, until Ctrl-C."""
    if not model:
        fail("nothing to serve: pass --model FOLDER_OR_REPO (or set [peer] model in config.toml)")
    if attest not in ATTEST_KINDS:
        fail(f"--attest must be one of {', '.join(ATTEST_KINDS)}, not {attest!r}")
    try:
        prices = parse_price(price_in), parse_price(price_out)
        for addr in [*listen, *bootstrap]:
            Multiaddr.parse(addr)
    except (ValueError, MultiaddrError) as e:
        fail(str(e))

    async def main() -> None:
        identity = load_or_create_identity(home_dir(home) / KEY_FILE_NAME)
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
            log_proof=log_proof,
            ledger=home_dir(home) / LEDGER_FILE,
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
            console.print(f"attestation {node.provider.kind}; Ctrl-C stops announcing and drains")
            async with trio.open_nursery() as ui:
                ui.start_soon(_status, node)
                await wait_for_interrupt()
                ui.cancel_scope.cancel()
            console.print("stopping: no new requests; finishing the running ones")
            node.request_stop()

    run(main)


def announced_addrs(node: PeerNode) -> list[str]:
    """Full multiaddrs (with /p2p/<id>) of every address we listen on."""
    assert node.host is not None
    return advertised_addrs(node.host)


def _table(node: PeerNode) -> Table:
    assert node.host is not None and node.pool is not None
    pool = node.pool
    table = Table(show_header=False, box=None)
    table.add_row("status", node.status)
    table.add_row("peers", str(node.host.num_connections))
    table.add_row("in flight", str(pool.in_flight))
    table.add_row("served", f"{pool.requests_total} requests, {pool.tokens_total} tokens")
    table.add_row("tok/s", f"{pool.tokens_per_second():.1f}")
    receipts, earned = node.earnings()
    table.add_row("earnings", f"{format_price(earned)} this epoch ({receipts} receipts)")
    return table


async def _status(node: PeerNode) -> None:
    if not console.is_terminal:
        await trio.sleep_forever()
    with Live(_table(node), console=console, refresh_per_second=2, transient=True) as live:
        while True:
            await trio.sleep(0.5)
            live.update(_table(node))
