"""The shim, assembled: a client-mode DHT peer, the attestor, the router and the HTTP API.

Used by `dbloom shim`, `dbloom demo` and the end-to-end tests alike.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import trio
from cryptography import x509

from dbloom.api import ApiKeys, check_bind, create_app, serve_api
from dbloom.api._network import NetworkEngine
from dbloom.api._routing import Router, RoutingPolicy
from dbloom.attest import Attestor, Policy
from dbloom.ledger import Ledger
from dbloom.ledger._service import ReceiptService
from dbloom.p2p import Host, KeyPair, Multiaddr, open_host
from dbloom.p2p.gossip import Gossip
from dbloom.p2p.kad import KadConfig, KademliaDHT


@dataclass(slots=True)
class ShimSettings:
    """The app developer's choices: where to listen and which nodes to trust."""

    host: str = "127.0.0.1"
    port: int = 8000
    bootstrap: list[str] = field(default_factory=list)
    allow_dev: bool = False
    attest_kinds: frozenset[str] | None = None
    max_price_in: int | None = None
    max_price_out: int | None = None
    log_keys: Sequence[bytes] = ()
    required_posture: frozenset[str] = frozenset()
    roots: dict[str, tuple[x509.Certificate, ...]] = field(default_factory=dict)
    app_ids: frozenset[str] = frozenset()
    keys: ApiKeys | None = None
    aliases: dict[str, str] = field(default_factory=dict)
    """Extra model names clients may use, alias -> real model id."""
    kad: KadConfig | None = None
    ledger: Path | None = None
    account: KeyPair | None = None
    notice: str | None = None
    """Shown with every model in `/v1/models` (a shim on someone else's relay says so)."""

    def policy(self) -> Policy:
        kinds = self.attest_kinds if self.attest_kinds is not None else Policy().allowed_kinds
        policy = Policy(
            allowed_kinds=frozenset(kinds),
            roots=self.roots,
            log_keys=tuple(self.log_keys),
            required_posture=self.required_posture,
            app_ids=self.app_ids,
        )
        return policy.with_dev() if self.allow_dev else policy


class ShimNode:
    """One running shim; `port` and `engine` are set once `run` has started."""

    def __init__(self, settings: ShimSettings, identity: KeyPair | None = None) -> None:
        self.settings = settings
        self.identity = identity or KeyPair.generate()
        self.port = 0
        self.host: Host | None = None
        self.engine: NetworkEngine | None = None
        self.ledger: Ledger | None = None
        self.receipts: ReceiptService | None = None

    @property
    def url(self) -> str:
        """The server's root: the base URL of Anthropic's SDKs."""
        host = self.settings.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    @property
    def base_url(self) -> str:
        """The base URL of OpenAI's SDKs."""
        return f"{self.url}/v1"

    async def run(
        self, *, task_status: trio.TaskStatus[ShimNode] = trio.TASK_STATUS_IGNORED
    ) -> None:
        s = self.settings
        check_bind(s.host, s.keys)
        policy = s.policy()
        async with AsyncExitStack() as stack:
            if s.ledger is not None:
                self.ledger = stack.enter_context(Ledger.open(s.ledger))
            host = self.host = await stack.enter_async_context(open_host(self.identity))
            nursery = await stack.enter_async_context(trio.open_nursery())
            kad = replace(
                s.kad or KadConfig(),
                mode="client",
                bootstrap=tuple(Multiaddr.parse(b) for b in s.bootstrap),
            )
            dht = KademliaDHT(host, kad)
            await nursery.start(dht.run)
            gossip = Gossip(host)
            await nursery.start(gossip.run)
            on_receipt = None
            if self.ledger is not None:
                self.receipts = ReceiptService(gossip, self.ledger)
                await nursery.start(self.receipts.run)
                on_receipt = self.receipts.submit
            router = Router(
                RoutingPolicy(
                    allowed_kinds=policy.allowed_kinds,
                    max_price_in=s.max_price_in,
                    max_price_out=s.max_price_out,
                ),
                rng=random.Random(),
            )
            self.engine = NetworkEngine(
                dht,
                Attestor(host, policy),
                router,
                account=s.account or KeyPair.generate(),
                on_receipt=on_receipt,
            )
            await nursery.start(self.engine.run)
            app = create_app(self.engine, keys=s.keys, aliases=s.aliases, notice=s.notice)
            self.port = await nursery.start(partial(serve_api, app, host=s.host, port=s.port))
            task_status.started(self)
