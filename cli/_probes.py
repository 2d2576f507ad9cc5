"""Readers of the machine's state for the availability policy: idle time, power, heat, memory.

Each reader answers None when this machine cannot tell, never a guess. macOS answers come
from commands any user may run (`ioreg`, `pmset`, `notifyutil`, `vm_stat`), Linux answers
from /sys, /proc and the desktop session (`xprintidle`, `loginctl`). The parsers are pure
functions, tested against recorded output; commands run under a timeout and are killed
when it passes or the caller is cancelled.

Thermal state on Apple silicon: `pmset -g therm` only reports Intel-era warning levels
("No thermal warning level has been recorded"), and `powermetrics` needs root. thermald
publishes its thermal pressure level to any user as the notify(3) key below (0 nominal,
1 moderate, 2 heavy, 3 trapping, 4 sleeping); we name the states as
`ProcessInfo.thermalState` does (moderate is fair, heavy serious, the rest critical).
`notifyutil -g` prints 0 even for a key nobody posts, so a machine without thermald
would read as nominal; every macOS since 10.10 has it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time as _time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, time
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from ._availability import Readings, Thermal

T = TypeVar("T")

COMMAND_TIMEOUT = 3.0
PROBE_TIMEOUT = 5.0
IOREG = ("/usr/sbin/ioreg", "-r", "-d", "1", "-c", "IOHIDSystem")
"""Only the IOHIDSystem entries and their properties, not the registry path to them."""
PMSET_BATT = ("/usr/bin/pmset", "-g", "batt")
THERMAL_KEY = "com.apple.system.thermalpressurelevel"
NOTIFYUTIL = ("/usr/bin/notifyutil", "-g", THERMAL_KEY)
VM_STAT = ("/usr/bin/vm_stat",)
POWER_SUPPLIES = Path("/sys/class/power_supply")
THERMAL_ZONES = Path("/sys/class/thermal")
MEMINFO = Path("/proc/meminfo")
LOGINCTL_FIELDS = ("-p", "Type", "-p", "IdleHint", "-p", "IdleSinceHintMonotonic")
SESSION_RECHECK = 30.0
GRAPHICAL_SESSIONS = frozenset({"x11", "wayland", "mir"})
_PRESSURE = {
    0: Thermal.NOMINAL,
    1: Thermal.FAIR,
    2: Thermal.SERIOUS,
    3: Thermal.CRITICAL,
    4: Thermal.CRITICAL,
}
_THERMAL_ORDER = list(Thermal)
_TRIP_LEVELS = {"passive": Thermal.FAIR, "hot": Thermal.SERIOUS, "critical": Thermal.CRITICAL}


class Probes(Protocol):
    """What the availability policy asks the machine; each answer may be None (unknown)."""

    async def idle_seconds(self) -> float | None: ...

    async def on_ac_power(self) -> bool | None: ...

    async def thermal(self) -> Thermal | None: ...

    async def free_memory(self) -> int | None: ...

    def local_time(self) -> time: ...


# ---- pure parsers (macOS command output) ------------------------------------------------


def parse_hid_idle(output: str) -> float | None:
    """Seconds since the last keyboard/mouse input, from `ioreg -r -d 1 -c IOHIDSystem` (ns).

    Several HID systems may be listed; the smallest value is the latest input.
    """
    values = [int(v) for v in re.findall(r'"HIDIdleTime"\s*=\s*(\d+)', output)]
    return min(values) / 1e9 if values else None


def parse_pmset_batt(output: str) -> bool | None:
    """On AC power, from `pmset -g batt`'s first line; UPS or battery power is not AC."""
    match = re.search(r"Now drawing from '([^']+)'", output)
    if match is None:
        return None
    return match[1] == "AC Power"


def parse_thermal_pressure(output: str) -> Thermal | None:
    """The thermal state from `notifyutil -g com.apple.system.thermalpressurelevel`."""
    match = re.fullmatch(rf"\s*{re.escape(THERMAL_KEY)}\s+(\d+)\s*", output)
    return None if match is None else _PRESSURE.get(int(match[1]))


def parse_vm_stat(output: str) -> int | None:
    """Bytes available without compressing or swapping: free, inactive and speculative pages
    (releases before 10.5 print no speculative line: none are counted)."""
    page = re.search(r"page size of (\d+) bytes", output)
    counts = dict(re.findall(r"^Pages (free|inactive|speculative):\s+(\d+)\.", output, re.M))
    if page is None or "free" not in counts or "inactive" not in counts:
        return None
    return sum(int(n) for n in counts.values()) * int(page[1])


# ---- pure parsers (Linux) ---------------------------------------------------------------


def parse_meminfo(text: str) -> int | None:
    """MemAvailable from /proc/meminfo, in bytes."""
    match = re.search(r"^MemAvailable:\s+(\d+) kB$", text, re.M)
    return None if match is None else int(match[1]) * 1024


def power_from_supplies(supplies: Sequence[Mapping[str, str]]) -> bool | None:
    """On AC from /sys/class/power_supply entries (their `type`, `online`, `status`, `scope`).

    Batteries of devices (a mouse, a keyboard) have `scope` Device and are ignored. No
    system supply at all (many desktops, VMs) is unknown rather than a guess.
    """
    system = [s for s in supplies if s.get("scope", "System") != "Device"]
    mains = [s for s in system if s.get("type") in ("Mains", "USB")]
    if any(s.get("online") == "1" for s in mains):
        return True
    batteries = [s for s in system if s.get("type") == "Battery"]
    if any(s.get("status") == "Discharging" for s in batteries) or mains:
        return False
    return None


def thermal_from_zones(zones: Sequence[Mapping[str, str]]) -> Thermal | None:
    """The worst state over thermal zones, each judged against its own trip points.

    A zone maps `temp` and `trip_point_N_type` / `trip_point_N_temp` (millidegrees). A zone
    at or above a passive trip is fair, hot is serious, critical is critical. Zones without
    usable trip points say nothing; when no zone has any, the state is unknown.
    """
    worst: Thermal | None = None
    for zone in zones:
        trips = _trip_points(zone)
        if not trips or not zone.get("temp", "").lstrip("-").isdigit():
            continue
        temp = int(zone["temp"])
        reached = [level for limit, level in trips if temp >= limit]
        state = max(reached, key=_THERMAL_ORDER.index, default=Thermal.NOMINAL)
        if worst is None or _THERMAL_ORDER.index(state) > _THERMAL_ORDER.index(worst):
            worst = state
    return worst


def _trip_points(zone: Mapping[str, str]) -> list[tuple[int, Thermal]]:
    """(millidegrees, state) for each passive, hot or critical trip with a real temperature."""
    trips = []
    for key, kind in zone.items():
        if not key.endswith("_type") or kind not in _TRIP_LEVELS:
            continue
        limit = zone.get(key.removesuffix("_type") + "_temp", "")
        if limit.isdigit() and int(limit) > 0:
            trips.append((int(limit), _TRIP_LEVELS[kind]))
    return trips


def parse_loginctl_session(output: str, now_monotonic_us: int) -> float | None:
    """Idle seconds of a graphical session from `loginctl show-session ID -p Type -p IdleHint
    -p IdleSinceHintMonotonic`; the desktop sets IdleHint after its own idle delay."""
    fields = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    if fields.get("Type") not in GRAPHICAL_SESSIONS:
        return None
    if fields.get("IdleHint") == "no":
        return 0.0
    since = fields.get("IdleSinceHintMonotonic", "")
    if fields.get("IdleHint") != "yes" or not since.isdigit() or int(since) == 0:
        return None
    return max(0, now_monotonic_us - int(since)) / 1e6


# ---- readers ------------------------------------------------------------------------------


async def command_output(*command: str, timeout: float = COMMAND_TIMEOUT) -> str | None:
    """A command's stdout, or None if it is missing, fails or outlives `timeout` (killed)."""
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(
                command, capture_stdout=True, stderr=subprocess.DEVNULL, check=False
            )
    except (OSError, trio.TooSlowError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.decode(errors="replace")


def read_sysfs_entries(folder: Path, pattern: str) -> list[dict[str, str]]:
    """Each matching sysfs folder as {file name: stripped contents} of its readable files."""
    entries = []
    for entry in sorted(folder.glob(pattern)):
        values = {}
        for file in entry.iterdir():
            try:
                if file.is_file():
                    values[file.name] = file.read_text().strip()
            except OSError:
                continue
        entries.append(values)
    return entries


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


class _LocalClock:
    def local_time(self) -> time:
        return datetime.now().time()


class MacProbes(_LocalClock):
    """macOS: system commands, no privileges needed."""

    async def idle_seconds(self) -> float | None:
        output = await command_output(*IOREG)
        return None if output is None else parse_hid_idle(output)

    async def on_ac_power(self) -> bool | None:
        output = await command_output(*PMSET_BATT)
        return None if output is None else parse_pmset_batt(output)

    async def thermal(self) -> Thermal | None:
        output = await command_output(*NOTIFYUTIL)
        return None if output is None else parse_thermal_pressure(output)

    async def free_memory(self) -> int | None:
        output = await command_output(*VM_STAT)
        return None if output is None else parse_vm_stat(output)


class LinuxProbes(_LocalClock):
    """Linux: sysfs and procfs; idle time from X11 or the logind session when there is one."""

    def __init__(
        self,
        *,
        power_supplies: Path = POWER_SUPPLIES,
        thermal_zones: Path = THERMAL_ZONES,
        meminfo: Path = MEMINFO,
    ) -> None:
        self.power_supplies = power_supplies
        self.thermal_zones = thermal_zones
        self.meminfo = meminfo
        self._xprintidle = shutil.which("xprintidle") if os.environ.get("DISPLAY") else None
        self._session: str | None = None
        self._next_lookup = 0.0

    async def idle_seconds(self) -> float | None:
        if self._xprintidle is not None:
            output = await command_output(self._xprintidle)
            if output is not None and output.strip().isdigit():
                return int(output) / 1000
        session = await self._graphical_session()
        if session is None:
            return None
        output = await command_output("loginctl", "show-session", session, *LOGINCTL_FIELDS)
        if output is None:
            self._session = None  # logged out: look again later
            return None
        return parse_loginctl_session(output, int(_time.monotonic() * 1e6))

    async def _graphical_session(self) -> str | None:
        """XDG_SESSION_ID, else the session logind shows on the display; while there is
        none, looked up again at most every SESSION_RECHECK seconds (a headless machine)."""
        if self._session is None and _time.monotonic() >= self._next_lookup:
            self._next_lookup = _time.monotonic() + SESSION_RECHECK
            output = os.environ.get("XDG_SESSION_ID") or await command_output(
                "loginctl", "show-user", str(os.getuid()), "-p", "Display", "--value"
            )
            self._session = (output or "").strip() or None
        return self._session

    async def on_ac_power(self) -> bool | None:
        supplies = await trio.to_thread.run_sync(read_sysfs_entries, self.power_supplies, "*")
        return power_from_supplies(supplies)

    async def thermal(self) -> Thermal | None:
        zones = await trio.to_thread.run_sync(
            read_sysfs_entries, self.thermal_zones, "thermal_zone*"
        )
        return thermal_from_zones(zones)

    async def free_memory(self) -> int | None:
        text = await trio.to_thread.run_sync(_read_text, self.meminfo)
        return None if text is None else parse_meminfo(text)


class NoProbes(_LocalClock):
    """Platforms we have no readers for: every answer is unknown."""

    async def idle_seconds(self) -> float | None:
        return None

    async def on_ac_power(self) -> bool | None:
        return None

    async def thermal(self) -> Thermal | None:
        return None

    async def free_memory(self) -> int | None:
        return None


def system_probes() -> Probes:
    """The readers for the platform we run on."""
    if sys.platform == "darwin":
        return MacProbes()
    if sys.platform.startswith("linux"):
        return LinuxProbes()
    return NoProbes()


# ---- sampling -----------------------------------------------------------------------------


async def _sample(read: Callable[[], Awaitable[T | None]]) -> T | None:
    """A probe's answer, or None if it does not answer within PROBE_TIMEOUT."""
    with trio.move_on_after(PROBE_TIMEOUT):
        return await read()
    return None


async def read_idle(probes: Probes) -> float | None:
    return await _sample(probes.idle_seconds)


async def read_machine(probes: Probes) -> Readings:
    """Everything but idle time (the slow, rarely changing readings), and the clock."""
    return Readings(
        clock=probes.local_time(),
        on_ac=await _sample(probes.on_ac_power),
        thermal=await _sample(probes.thermal),
        free_memory=await _sample(probes.free_memory),
    )


async def read_all(probes: Probes) -> Readings:
    return replace(await read_machine(probes), idle=await read_idle(probes))
