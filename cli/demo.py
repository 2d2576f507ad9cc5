"""`dbloom demo`: a small network on loopback, shown step by step."""

from __future__ import annotations

import trio
from rich.table import Table

from dbloom.p2p import KeyPair, identify, open_host, ping

from ._common import console, run


def demo() -> None:
    """Start two peers on 127.0.0.1; they connect, identify and ping each other."""

    async def main() -> None:
        async with (
            open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"]) as alice,
            open_host(KeyPair.generate(), listen=["/ip4/127.0.0.1/tcp/0"]) as bob,
        ):
            console.rule("[bold]dbloom demo: two peers on loopback")
            for name, host in (("alice", alice), ("bob", bob)):
                console.print(f"[bold]{name}[/bold] listening on {host.listen_addrs[0]}")
            start = trio.current_time()
            conn = await alice.connect(bob.listen_addrs[0])
            console.print(
                f"alice → bob: TCP + Noise XX + yamux up in "
                f"{(trio.current_time() - start) * 1000:.1f} ms (bob is {conn.peer_id.short()})"
            )
            table = Table(title="identify", show_lines=False)
            table.add_column("asked")
            table.add_column("agent")
            table.add_column("protocols")
            table.add_column("sees the asker at")
            for asker, other, name in ((alice, bob, "bob"), (bob, alice, "alice")):
                info = await identify(asker, other.peer_id)
                table.add_row(
                    name,
                    info.agent_version or "-",
                    ", ".join(info.protocols),
                    str(info.observed_addr),
                )
            console.print(table)
            for asker, other, label in ((alice, bob, "alice → bob"), (bob, alice, "bob → alice")):
                rtts = await ping(asker, other.peer_id, count=5)
                shown = ", ".join(f"{r * 1e6:.0f}" for r in rtts)
                console.print(f"ping {label}: {shown} µs")
            console.print(
                "[green]done[/green]: the peers authenticated each other "
                "and talked over one encrypted connection"
            )

    run(main)
