"""Serving the shim with Hypercorn on trio, and the rule about where it may listen.

Hypercorn's access log is off and its error log goes to the `dbloom.api.server` logger:
request lines and tracebacks can quote what clients sent, and prompts must never reach
a log. Cancelling `serve_api` shuts down gracefully: no new connections, and requests
in flight get `grace` seconds to finish.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework
from starlette.types import ASGIApp

from ._errors import InsecureBind
from ._keys import ApiKeys

GRACE = 5.0
"""Seconds in-flight requests get to finish when the server stops."""
BACKLOG = 4096
"""Connections the kernel queues before we accept them: a burst of clients connecting at
once must not find the queue full (Hypercorn's default of 100 refuses the rest; Linux
caps it at `net.core.somaxconn`)."""
SHUTDOWN_MARGIN = 1.0

logger = logging.getLogger("dbloom.api.server")


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: ApiKeys | None) -> None:
    """Refuse to serve beyond loopback with no API keys: anyone could use the network."""
    if not is_loopback(host) and (keys is None or len(keys) == 0):
        raise InsecureBind(f"binding {host} requires API keys: run `dbloom shim keys add NAME`")


def _config(host: str, port: int, grace: float, backlog: int) -> Config:
    config = Config()
    address = f"[{host.strip('[]')}]" if ":" in host else host
    config.bind = [f"{address}:{port}"]
    config.backlog = backlog
    config.accesslog = None
    config.errorlog = logger
    config.graceful_timeout = grace
    config.include_server_header = False
    return config


async def _serve_shielded(
    app: ASGIApp,
    config: Config,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hypercorn, shielded from outer cancellation so that it can drain; `stop` starts
    its own graceful shutdown, bounded by a deadline."""
    with trio.CancelScope(shield=True) as scope:

        async def shutdown_trigger() -> None:
            await stop.wait()
            scope.deadline = trio.current_time() + config.graceful_timeout + SHUTDOWN_MARGIN

        framework = cast(ASGIFramework, app)
        await serve(framework, config, shutdown_trigger=shutdown_trigger, task_status=task_status)


async def serve_api(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    grace: float = GRACE,
    backlog: int = BACKLOG,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `host:port` until cancelled; reports the bound port (port 0 picks
    one) through `task_status`."""
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        try:
            config = _config(host, port, grace, backlog)
            binds: list[str] = await nursery.start(_serve_shielded, app, config, stop)
            task_status.started(int(binds[0].rsplit(":", 1)[1]))
            await trio.sleep_forever()
        finally:
            stop.set()
