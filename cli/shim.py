"""`dbloom shim`: OpenAI- and Anthropic-compatible APIs on this machine, served by attested
nodes."""

from __future__ import annotations

from pathlib import Path

import trio
import typer
from cryptography import x509

from dbloom.api import (
    ApiKeys,
    InsecureBind,
    KeyStoreError,
    check_bind,
    is_loopback,
    keys_app,
    parse_aliases,
)
from dbloom.attest import HARDWARE_KINDS, default_verifiers, production_roots
from dbloom.attest._evidence import POSTURE_KEYS
from dbloom.ledger._money import parse_price
from dbloom.p2p import Multiaddr, MultiaddrError, load_or_create_identity

from ._common import console, fail, home_dir, run
from ._shim import ShimNode, ShimSettings
from .p2p import wait_for_interrupt
from .peer import LEDGER_FILE

ACCOUNT_KEY_FILE = "account.key"

app = typer.Typer(
    help="The OpenAI- and Anthropic-compatible API that routes to attested nodes.",
    invoke_without_command=True,
)
app.add_typer(keys_app, name="keys")


def _api_keys(host: str, home: Path | None, required: bool) -> ApiKeys | None:
    """The store whose keys clients must present: always beyond loopback, and on loopback
    too when `required`, since other local users, or a proxy in front, may reach it."""
    if not required:
        return None if is_loopback(host) else ApiKeys.in_home(home_dir(home))
    keys = ApiKeys.in_home(home_dir(home))
    try:
        count = len(keys)
    except KeyStoreError as e:
        fail(str(e))
    if not count:
        fail("--require-key needs an API key: run `dbloom shim keys add NAME`")
    return keys


def _load_roots(paths: list[Path]) -> tuple[x509.Certificate, ...]:
    roots: list[x509.Certificate] = []
    for path in paths:
        data = path.read_bytes()
        try:
            if b"-----BEGIN" in data:
                roots.extend(x509.load_pem_x509_certificates(data))
            else:
                roots.append(x509.load_der_x509_certificate(data))
        except ValueError as e:
            fail(f"{path} is not a certificate: {e}")
    return tuple(roots)


@app.callback()
def shim(
    ctx: typer.Context,
    host: str = typer.Option(
        "127.0.0.1", "--host", envvar="DBLOOM_SHIM_HOST", help="Address to listen on."
    ),
    port: int = typer.Option(
        8000, "--port", min=0, max=65535, envvar="DBLOOM_SHIM_PORT", help="Port to listen on."
    ),
    bootstrap: list[str] = typer.Option(
        [],
        "--bootstrap",
        "-b",
        envvar="DBLOOM_BOOTSTRAP",
        help="Peer to join through (repeatable).",
    ),
    allow_dev: bool = typer.Option(
        False, "--allow-dev", help="Accept dev attestation (identity-signed only: untrusted)."
    ),
    attest_kinds: str = typer.Option(
        ",".join(sorted(HARDWARE_KINDS)), "--attest-kinds", help="Evidence kinds to accept."
    ),
    max_price: str | None = typer.Option(
        None, "--max-price", help="Highest output price per 1M tokens to route to."
    ),
    log_key: list[str] = typer.Option(
        [], "--log-key", help="Trusted transparency-log key (hex); requires logged software."
    ),
    require: list[str] = typer.Option(
        [], "--require", help="Posture the node must show: sip, secure_boot, ... (repeatable)."
    ),
    tpm_root: list[Path] = typer.Option(
        [], "--tpm-root", help="Root certificate trusted for tpm2 attestation keys (repeatable)."
    ),
    app_id: list[str] = typer.Option(
        [], "--app-id", help="App Attest app id (TEAMID.bundle) of the node helper."
    ),
    alias: list[str] = typer.Option(
        [],
        "--alias",
        envvar="DBLOOM_SHIM_ALIAS",
        help="Another name clients may ask for a model by, NAME=MODEL (repeatable): gpt-3=tiny.",
    ),
    require_key: bool = typer.Option(
        False,
        "--require-key",
        envvar="DBLOOM_SHIM_REQUIRE_KEY",
        help="Require an API key even on loopback (always required beyond it).",
    ),
    home: Path | None = typer.Option(None, "--home", help="Home folder (API keys)."),
) -> None:
    """Serve the OpenAI and Anthropic APIs on HOST:PORT until Ctrl-C (`dbloom shim keys`
    manages API keys)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        max_out = parse_price(max_price) if max_price is not None else None
        for addr in bootstrap:
            Multiaddr.parse(addr)
        aliases = parse_aliases(alias)
    except (ValueError, MultiaddrError) as e:
        fail(str(e))
    try:
        keys_hex = [bytes.fromhex(k) for k in log_key]
    except ValueError:
        keys_hex = []
    if len(keys_hex) != len(log_key) or any(len(k) != 32 for k in keys_hex):
        fail("--log-key must be a 32-byte Ed25519 public key in hex")
    kinds = frozenset(k.strip() for k in attest_kinds.split(",") if k.strip())
    if unknown := kinds - set(default_verifiers()):
        fail(
            f"--attest-kinds: unknown kind {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(default_verifiers()))})"
        )
    if odd := set(require) - set(POSTURE_KEYS):
        fail(
            f"--require: unknown posture {', '.join(sorted(odd))} "
            f"(known: {', '.join(POSTURE_KEYS)})"
        )
    keys = _api_keys(host, home, require_key)
    try:
        check_bind(host, keys)  # refused before anything is written to the home folder
    except InsecureBind as e:
        fail(str(e))
    settings = ShimSettings(
        host=host,
        port=port,
        bootstrap=bootstrap,
        allow_dev=allow_dev,
        attest_kinds=kinds,
        max_price_out=max_out,
        log_keys=keys_hex,
        required_posture=frozenset(require),
        roots={**production_roots(), "tpm2": _load_roots(tpm_root)},
        app_ids=frozenset(app_id),
        keys=keys,
        aliases=aliases,
        ledger=home_dir(home) / LEDGER_FILE,
        account=load_or_create_identity(home_dir(home) / ACCOUNT_KEY_FILE),
    )

    async def main() -> None:
        node = ShimNode(settings)
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(node.run)
            except InsecureBind as e:
                fail(str(e))
            console.print(f"OpenAI-compatible API on {node.base_url}")
            console.print(f"Anthropic-compatible API on {node.url}")
            for name, model in aliases.items():
                console.print(f"model alias {name} -> {model}")
            if allow_dev:
                console.print("[yellow]accepting dev attestation: nodes are not verified[/yellow]")
            await wait_for_interrupt()
            console.print("stopping")
            nursery.cancel_scope.cancel()

    run(main)
