"""`dbloom service`: keep `dbloom peer` running in the background, from login on.

macOS gets a launchd agent (`~/Library/LaunchAgents/org.dbloom.peer.plist`, loaded with
`launchctl bootstrap gui/$UID`), Linux a systemd user unit
(`~/.config/systemd/user/dbloom-peer.service`, enabled with `systemctl --user`). The peer
takes its options from config.toml like an interactive one, logs to a size-rotated
`<home>/logs/peer.log`, and the service manager sends stdout and stderr (start-up lines,
crash dumps) to files beside it. Both keep core dumps off and give the peer time to drain
before killing it. Writing the files is pure; every launchctl/systemctl call goes through
`ServiceManager.run_ctl`, which tests point at a script of their own (`DBLOOM_SERVICE_CTL`
does the same for the command).
"""

from __future__ import annotations

import contextlib
import os
import plistlib
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import typer

from ._common import console, fail, home_dir
from ._config import config_path
from .status import is_running, print_rows, read_status, status_path, status_rows

app = typer.Typer(help="Run `dbloom peer` in the background (launchd or systemd).")

LABEL = "org.dbloom.peer"
UNIT = "dbloom-peer.service"
LAUNCHCTL = "/bin/launchctl"
SYSTEMCTL = "systemctl"
LOGS = "logs"
PEER_LOG = "peer.log"
OUT_LOG = "service.out.log"
ERR_LOG = "service.err.log"
PASSED_ENV = ("DBLOOM_CONFIG", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE")
"""Variables a service inherits from the shell that installs it (it starts with none)."""
STOP_MARGIN = 15
RESTART_DELAY = 30
CTL_TIMEOUT = 90.0
FOLLOW_POLL = 0.5
ServiceKind = Literal["launchd", "systemd"]


class ServiceError(Exception):
    """The service manager refused, failed, or is missing."""


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """What the service runs, where it writes, and how long it may take to stop."""

    program: tuple[str, ...]
    home: Path
    environment: Mapping[str, str]
    stop_timeout: int

    @property
    def logs(self) -> Path:
        return self.home / LOGS


def service_spec(
    home: Path,
    *,
    python: str = sys.executable,
    drain_timeout: float = 30.0,
    environ: Mapping[str, str] = os.environ,
) -> ServiceSpec:
    """`python -m dbloom.cli peer --log-file <home>/logs/peer.log`, with the peer's home."""
    home = home.expanduser().absolute()
    env = {"DBLOOM_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    for name in PASSED_ENV:
        if value := environ.get(name):
            is_path = name != "HF_HUB_OFFLINE"
            env[name] = str(Path(value).expanduser().absolute()) if is_path else value
    program = (python, "-m", "dbloom.cli", "peer", "--log-file", str(home / LOGS / PEER_LOG))
    return ServiceSpec(
        program=program,
        home=home,
        environment=env,
        stop_timeout=int(drain_timeout) + STOP_MARGIN,
    )


def launchd_plist(spec: ServiceSpec) -> bytes:
    """The launch agent: started at login, restarted after a crash (not after a clean exit)."""
    agent: dict[str, Any] = {
        "Label": LABEL,
        "ProgramArguments": list(spec.program),
        "EnvironmentVariables": dict(spec.environment),
        "WorkingDirectory": str(spec.home),
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": RESTART_DELAY,
        "ExitTimeOut": spec.stop_timeout,
        "StandardOutPath": str(spec.logs / OUT_LOG),
        "StandardErrorPath": str(spec.logs / ERR_LOG),
        "SoftResourceLimits": {"Core": 0},
        "HardResourceLimits": {"Core": 0},
    }
    return plistlib.dumps(agent, fmt=plistlib.FMT_XML)


def _unit_text(value: str) -> str:
    """`value` safe in a unit file line: no line breaks, `%` specifiers escaped."""
    if "\n" in value or "\r" in value:
        raise ServiceError(f"{value!r} contains a line break")
    return value.replace("%", "%%")


def _unit_quote(value: str) -> str:
    """One double-quoted word for ExecStart= or Environment= (`$` expands in ExecStart)."""
    escaped = _unit_text(value).replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$")
    return f'"{escaped}"'


def systemd_unit(spec: ServiceSpec) -> str:
    """The user unit: started at login (default.target), restarted after a failure."""
    env = "\n".join(
        f"Environment={_unit_quote(f'{k}={v}')}" for k, v in sorted(spec.environment.items())
    )
    return (
        "# Written by `dbloom service install`; `dbloom service uninstall` removes it.\n"
        "[Unit]\n"
        "Description=dbloom peer: serves models to the dbloom network while this machine is idle\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={' '.join(_unit_quote(a) for a in spec.program)}\n"
        f"{env}\n"
        f"WorkingDirectory={_unit_text(str(spec.home))}\n"
        "Restart=on-failure\n"
        f"RestartSec={RESTART_DELAY}\n"
        f"TimeoutStopSec={spec.stop_timeout}\n"
        "LimitCORE=0\n"
        f"StandardOutput=append:{_unit_text(str(spec.logs / OUT_LOG))}\n"
        f"StandardError=append:{_unit_text(str(spec.logs / ERR_LOG))}\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def parse_launchctl_print(output: str) -> tuple[str | None, int | None]:
    """(state, pid) of the service from `launchctl print gui/$UID/org.dbloom.peer`."""
    state = re.search(r"^\s*state = (.+?)\s*$", output, re.M)
    pid = re.search(r"^\s*pid = (\d+)", output, re.M)
    return (state[1] if state else None), (int(pid[1]) if pid else None)


def parse_systemctl_show(output: str) -> dict[str, str]:
    """`systemctl show -p A -p B` output (`A=value` lines) as a map."""
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


@dataclass(frozen=True, slots=True)
class ServiceState:
    installed: bool
    running: bool
    pid: int | None
    detail: str


@dataclass(frozen=True, slots=True)
class ServiceManager:
    """launchd or systemd for one user; `ctl` is the launchctl or systemctl to run."""

    kind: ServiceKind
    ctl: str
    user_home: Path
    uid: int

    @property
    def file(self) -> Path:
        if self.kind == "launchd":
            return self.user_home / "Library" / "LaunchAgents" / f"{LABEL}.plist"
        return self.user_home / ".config" / "systemd" / "user" / UNIT

    @property
    def _target(self) -> str:
        return f"gui/{self.uid}/{LABEL}"

    def run_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Every call to launchctl or systemctl; raises ServiceError when `check` fails."""
        argv = [self.ctl, *(("--user",) if self.kind == "systemd" else ()), *args]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=CTL_TIMEOUT, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ServiceError(f"cannot run {self.ctl}: {e}") from None
        if check and done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()
            raise ServiceError(
                f"{' '.join(argv[1:])} failed: {why[-1] if why else f'exit {done.returncode}'}"
            )
        return done

    def install(self, spec: ServiceSpec) -> None:
        """Write the service file and (re)start the service from it."""
        spec.logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        content = launchd_plist(spec) if self.kind == "launchd" else systemd_unit(spec).encode()
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{self.file.name}.tmp")
        tmp.write_bytes(content)
        tmp.replace(self.file)
        if self.kind == "launchd":
            self.run_ctl("bootout", self._target, check=False)
            self.run_ctl("enable", self._target)
            self.run_ctl("bootstrap", f"gui/{self.uid}", str(self.file))
        else:
            self.run_ctl("daemon-reload")
            self.run_ctl("enable", UNIT)
            self.run_ctl("restart", UNIT)

    def uninstall(self) -> bool:
        """Stop the service and remove its file; False if it was not installed."""
        if not self.file.exists():
            return False
        if self.kind == "launchd":
            self.run_ctl("bootout", self._target, check=False)
            self.file.unlink()
        else:
            self.run_ctl("disable", "--now", UNIT, check=False)
            self.file.unlink()
            self.run_ctl("daemon-reload")
        return True

    def state(self) -> ServiceState:
        installed = self.file.exists()
        if self.kind == "launchd":
            done = self.run_ctl("print", self._target, check=False)
            if done.returncode != 0:
                return ServiceState(installed, False, None, "not loaded")
            state, pid = parse_launchctl_print(done.stdout)
            return ServiceState(installed, state == "running", pid, state or "unknown")
        done = self.run_ctl(
            "show", UNIT, "-p", "ActiveState", "-p", "SubState", "-p", "MainPID", check=False
        )
        fields = parse_systemctl_show(done.stdout)
        pid = int(fields.get("MainPID", "0") or 0) or None
        detail = f"{fields.get('ActiveState', 'unknown')} ({fields.get('SubState', '?')})"
        return ServiceState(installed, fields.get("SubState") == "running", pid, detail)


def system_manager() -> ServiceManager:
    """The service manager of this platform (DBLOOM_SERVICE_CTL replaces its tool)."""
    ctl = os.environ.get("DBLOOM_SERVICE_CTL")
    if sys.platform == "darwin":
        return ServiceManager("launchd", ctl or LAUNCHCTL, Path.home(), os.getuid())
    if sys.platform.startswith("linux"):
        return ServiceManager("systemd", ctl or SYSTEMCTL, Path.home(), os.getuid())
    raise ServiceError(f"no background service support on {sys.platform}")


def _manager() -> ServiceManager:
    try:
        return system_manager()
    except ServiceError as e:
        fail(str(e))


def _peer_defaults(ctx: typer.Context) -> dict[str, Any]:
    root = ctx.find_root().default_map or {}
    peer = root.get("peer")
    return peer if isinstance(peer, dict) else {}


@app.command("install")
def install(ctx: typer.Context) -> None:
    """Install and start the background peer; it takes its options from config.toml."""
    peer = _peer_defaults(ctx)
    if not peer.get("model"):
        fail(
            f'nothing to serve: set [peer] model = ["FOLDER_OR_REPO"] in {config_path()} '
            "first (the service reads its options from there)"
        )
    spec = service_spec(home_dir(), drain_timeout=float(peer.get("drain_timeout", 30.0)))
    manager = _manager()
    try:
        manager.install(spec)
    except ServiceError as e:
        fail(str(e))
    console.print(f"installed {manager.file}")
    console.print(f"logs in {spec.logs} (`dbloom service logs`); `dbloom status` shows the peer")


@app.command("uninstall")
def uninstall() -> None:
    """Stop the background peer and remove its service file."""
    manager = _manager()
    try:
        removed = manager.uninstall()
    except ServiceError as e:
        fail(str(e))
    console.print(f"removed {manager.file}" if removed else "the service is not installed")


@app.command("status")
def service_status() -> None:
    """Whether the service is installed and running, and what its peer reports."""
    manager = _manager()
    try:
        state = manager.state()
    except ServiceError as e:
        fail(str(e))
    where = f" ({manager.file})" if state.installed else ""
    console.print(f"service  {'installed' if state.installed else 'not installed'}{where}")
    pid = f", pid {state.pid}" if state.pid else ""
    console.print(f"running  {'yes' if state.running else 'no'}: {state.detail}{pid}")
    snapshot = read_status(status_path(home_dir()))
    if snapshot is not None and is_running(snapshot):
        print_rows(status_rows(snapshot))


def last_lines(data: bytes, lines: int) -> str:
    """The last `lines` lines of a log's bytes."""
    kept = data.decode(errors="replace").splitlines(keepends=True)
    return "".join(kept[len(kept) - lines :]) if lines else ""


def follow(path: Path, inode: int, offset: int) -> None:
    """Print what is appended to `path` after `offset`, across rotations, until Ctrl-C."""
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(FOLLOW_POLL)
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            if info.st_ino != inode or info.st_size < offset:
                inode, offset = info.st_ino, 0
            if info.st_size > offset:
                with path.open("rb") as handle:
                    handle.seek(offset)
                    data = handle.read()
                offset += len(data)
                sys.stdout.write(data.decode(errors="replace"))
                sys.stdout.flush()


@app.command("logs")
def logs(
    lines: int = typer.Option(50, "--lines", "-n", min=0, help="Lines to show."),
    follow_: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
) -> None:
    """Show the background peer's log (request ids, counts and timings; never prompts)."""
    path = home_dir() / LOGS / PEER_LOG
    try:
        with path.open("rb") as handle:
            data, inode = handle.read(), os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        fail(f"no log at {path}: is the service installed (`dbloom service install`)?")
    sys.stdout.write(last_lines(data, lines))
    sys.stdout.flush()
    if follow_:
        follow(path, inode, len(data))
