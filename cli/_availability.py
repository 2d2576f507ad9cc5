"""When a peer serves: the owner's rules against what the machine reports, as a state machine.

Sans-IO: `Availability.update(readings, now)` takes one sample of the machine (read by
`_probes.py`) and trio's clock, and returns a `Decision`: serve or pause, with every
check's verdict in words, so `dbloom peer` and `dbloom status` can say why. The shell
(`PeerNode`) samples the idle time several times a second and acts on every change, so
the owner's first keystroke stops new work within a poll.

A reading that cannot be made here (None) never blocks serving, but its check says
"unknown": an owner sees what was not checked instead of a silent pass. Coming back from
a pause needs every condition to hold for `Rules.settle` seconds, so a Mac hovering at a
threshold (heat, memory) does not withdraw and re-announce on every sample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import time
from enum import StrEnum
from typing import Literal

_RANGE = re.compile(r"^(\d{1,2}):(\d{2})-(\d{1,2}):(\d{2})$")

CheckState = Literal["ok", "blocks", "unknown"]


class Thermal(StrEnum):
    """The names macOS gives its thermal states (`ProcessInfo.thermalState`)."""

    NOMINAL = "nominal"
    FAIR = "fair"
    SERIOUS = "serious"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class Window:
    """Local minutes [start, end) after midnight; `end < start` wraps past midnight."""

    start: int
    end: int

    def contains(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{_clock(self.start)}-{_clock(self.end)}"


@dataclass(frozen=True, slots=True)
class Hours:
    """The owner's serving hours: one or more local-time windows."""

    windows: tuple[Window, ...]

    def contains(self, at: time) -> bool:
        minute = at.hour * 60 + at.minute
        return any(w.contains(minute) for w in self.windows)

    def __str__(self) -> str:
        return ",".join(map(str, self.windows))


def _clock(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _minute(hours: str, minutes: str, *, end: bool) -> int:
    h, m = int(hours), int(minutes)
    if m > 59 or h > 24 or (h == 24 and (m or not end)):
        raise ValueError(f"{hours}:{minutes} is not a time of day (00:00 to 23:59)")
    return h * 60 + m


def parse_hours(text: str) -> Hours:
    """`"22:00-07:00"` or several windows joined by commas; raises ValueError saying why."""
    windows = []
    for part in text.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise ValueError(f"{part.strip()!r} is not a range like 22:00-07:00")
        start = _minute(match[1], match[2], end=False)
        end = _minute(match[3], match[4], end=True)
        if start == end:
            raise ValueError(f"{part.strip()!r} is empty (use 00:00-24:00 for all day)")
        windows.append(Window(start, end))
    return Hours(tuple(windows))


@dataclass(frozen=True, slots=True, kw_only=True)
class Rules:
    """The owner's conditions; `memory_need` is filled in by the node from its models."""

    idle_minutes: float = 5.0
    hours: Hours | None = None
    serve_on_battery: bool = False
    memory_need: int = 0
    always_on: bool = False
    settle: float = 30.0

    def __post_init__(self) -> None:
        if self.idle_minutes < 0 or self.settle < 0 or self.memory_need < 0:
            raise ValueError("idle minutes, settle time and memory need must be non-negative")


@dataclass(frozen=True, slots=True, kw_only=True)
class Readings:
    """One sample of the machine; None means "cannot be read here"."""

    clock: time
    idle: float | None = None
    on_ac: bool | None = None
    thermal: Thermal | None = None
    free_memory: int | None = None


@dataclass(frozen=True, slots=True)
class Check:
    """One condition's verdict, in words an owner understands."""

    name: str
    state: CheckState
    text: str


@dataclass(frozen=True, slots=True)
class Decision:
    """Serve or pause, and every check behind it."""

    serve: bool
    checks: tuple[Check, ...]

    @property
    def reasons(self) -> tuple[str, ...]:
        """Why the node is paused (empty when serving)."""
        return tuple(c.text for c in self.checks if c.state == "blocks")

    @property
    def unknown(self) -> tuple[str, ...]:
        """What could not be checked on this machine."""
        return tuple(c.text for c in self.checks if c.state == "unknown")

    def summary(self) -> str:
        text = "serving" if self.serve else "paused: " + "; ".join(self.reasons)
        if self.unknown:
            text += " (" + "; ".join(self.unknown) + ")"
        return text


ALWAYS_ON = Decision(True, (Check("always-on", "ok", "always on: conditions are not checked"),))


def duration(seconds: float) -> str:
    """Seconds in the unit a person would use."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def _idle(rules: Rules, idle: float | None) -> Check:
    if idle is None:
        return Check("idle", "unknown", "idle time unknown here: not checked")
    if idle < rules.idle_minutes * 60:
        need = duration(rules.idle_minutes * 60)
        return Check("idle", "blocks", f"owner active {duration(idle)} ago (serves after {need})")
    return Check("idle", "ok", f"owner idle for {duration(idle)}")


def _power(rules: Rules, on_ac: bool | None) -> Check:
    if on_ac is None:
        return Check("power", "unknown", "power source unknown here: not checked")
    if on_ac:
        return Check("power", "ok", "on AC power")
    if rules.serve_on_battery:
        return Check("power", "ok", "on battery power (allowed)")
    return Check("power", "blocks", "on battery power")


def _thermal(thermal: Thermal | None) -> Check:
    if thermal is None:
        return Check("thermal", "unknown", "thermal state unknown here: not checked")
    if thermal is Thermal.NOMINAL:
        return Check("thermal", "ok", "thermal state nominal")
    return Check("thermal", "blocks", f"thermal state {thermal} (serves when nominal)")


def _memory(rules: Rules, free: int | None) -> Check:
    if free is None:
        return Check("memory", "unknown", "free memory unknown here: not checked")
    need = f"the models need {gib(rules.memory_need)}"
    if free < rules.memory_need:
        return Check("memory", "blocks", f"only {gib(free)} free; {need}")
    return Check("memory", "ok", f"{gib(free)} free; {need}")


def _hours(hours: Hours, clock: time) -> Check:
    now = clock.strftime("%H:%M")
    if hours.contains(clock):
        return Check("hours", "ok", f"inside serving hours {hours} (now {now})")
    return Check("hours", "blocks", f"outside serving hours {hours} (now {now})")


def evaluate(rules: Rules, readings: Readings) -> tuple[Check, ...]:
    """Every condition's verdict for one sample; no memory of earlier samples."""
    checks = []
    if rules.idle_minutes > 0:
        checks.append(_idle(rules, readings.idle))
    checks += [
        _power(rules, readings.on_ac),
        _thermal(readings.thermal),
        _memory(rules, readings.free_memory),
    ]
    if rules.hours is not None:
        checks.append(_hours(rules.hours, readings.clock))
    return tuple(checks)


class Availability:
    """The decision over time: pause at once when a condition fails, serve again only after
    every condition held for `settle` seconds (from the start, as soon as they hold)."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self._serving: bool | None = None
        self._holding_since: float | None = None

    def update(self, readings: Readings, now: float) -> Decision:
        if self.rules.always_on:
            return ALWAYS_ON
        checks = evaluate(self.rules, readings)
        if any(c.state == "blocks" for c in checks):
            self._serving = False
            self._holding_since = None
            return Decision(False, checks)
        if self._holding_since is None:
            self._holding_since = now
        waited = now - self._holding_since
        if self._serving is None or self._serving or waited >= self.rules.settle:
            self._serving = True
            return Decision(True, checks)
        left = duration(self.rules.settle - waited)
        steady = Check("steady", "blocks", f"conditions met; serving again in {left} if they hold")
        return Decision(False, (*checks, steady))
