"""Readers of the machine's state: parsers against recorded output (see data/README.md),
the Linux readers against a sysfs tree built here, and the command runner's timeout."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import trio

from dbloom.cli._availability import Readings, Thermal
from dbloom.cli._probes import (
    LinuxProbes,
    command_output,
    parse_hid_idle,
    parse_loginctl_session,
    parse_meminfo,
    parse_pmset_batt,
    parse_thermal_pressure,
    parse_vm_stat,
    power_from_supplies,
    read_all,
    system_probes,
    thermal_from_zones,
)

DATA = Path(__file__).parent / "data"


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def test_hid_idle_time_from_ioreg() -> None:
    assert parse_hid_idle(recorded("ioreg_hidsystem_active.txt")) == pytest.approx(0.183417292)
    assert parse_hid_idle(recorded("ioreg_hidsystem_idle.txt")) == pytest.approx(421.337084166)
    both = recorded("ioreg_hidsystem_idle.txt") + recorded("ioreg_hidsystem_active.txt")
    assert parse_hid_idle(both) == pytest.approx(0.183417292)  # the latest input wins
    assert parse_hid_idle("+-o IOHIDSystem  <class IOHIDSystem>\n") is None


@pytest.mark.parametrize(
    ("name", "on_ac"),
    [
        ("pmset_batt_ac.txt", True),
        ("pmset_batt_ac_on_hold.txt", True),
        ("pmset_batt_battery.txt", False),
        ("pmset_batt_desktop.txt", True),
    ],
)
def test_power_source_from_pmset(name: str, on_ac: bool) -> None:
    assert parse_pmset_batt(recorded(name)) is on_ac


def test_pmset_without_a_source_line_is_unknown() -> None:
    assert parse_pmset_batt("Now drawing from 'UPS Power'\n") is False
    assert parse_pmset_batt("") is None


def test_thermal_pressure_from_notifyutil() -> None:
    assert parse_thermal_pressure(recorded("notifyutil_thermal_nominal.txt")) is Thermal.NOMINAL
    assert parse_thermal_pressure(recorded("notifyutil_thermal_heavy.txt")) is Thermal.SERIOUS
    assert parse_thermal_pressure("com.apple.system.thermalpressurelevel 4\n") is Thermal.CRITICAL
    assert parse_thermal_pressure("com.apple.system.thermalpressurelevel 9\n") is None
    assert parse_thermal_pressure("com.apple.other.key 0\n") is None


def test_available_memory_from_vm_stat() -> None:
    assert parse_vm_stat(recorded("vm_stat.txt")) == (14523 + 331005 + 3861) * 16384
    assert parse_vm_stat("Pages free: 12.\n") is None


def test_available_memory_from_meminfo() -> None:
    assert parse_meminfo(recorded("meminfo.txt")) == 21893400 * 1024
    assert parse_meminfo("MemTotal: 1 kB\n") is None


def test_idle_time_from_a_logind_session() -> None:
    now_us = 7_500_000_000
    assert parse_loginctl_session(recorded("loginctl_idle.txt"), now_us) == pytest.approx(300.0)
    assert parse_loginctl_session(recorded("loginctl_active.txt"), now_us) == 0.0
    assert parse_loginctl_session(recorded("loginctl_tty.txt"), now_us) is None


def test_power_from_sysfs_supplies() -> None:
    ac = {"type": "Mains", "online": "1"}
    unplugged = {"type": "Mains", "online": "0"}
    battery = {"type": "Battery", "status": "Discharging", "scope": "System"}
    mouse = {"type": "Battery", "status": "Discharging", "scope": "Device"}
    assert power_from_supplies([ac, battery]) is True
    assert power_from_supplies([unplugged, battery]) is False
    assert power_from_supplies([battery]) is False
    assert power_from_supplies([mouse]) is None
    assert power_from_supplies([]) is None


def zone(temp: int, **trips: int) -> dict[str, str]:
    out = {"type": "x86_pkg_temp", "temp": str(temp)}
    for i, (kind, limit) in enumerate(trips.items()):
        out |= {f"trip_point_{i}_type": kind, f"trip_point_{i}_temp": str(limit)}
    return out


def test_thermal_from_sysfs_zones() -> None:
    cool = zone(45000, passive=85000, critical=105000)
    warm = zone(86000, passive=85000, hot=95000, critical=105000)
    hot = zone(97000, passive=85000, hot=95000, critical=105000)
    assert thermal_from_zones([cool]) is Thermal.NOMINAL
    assert thermal_from_zones([cool, warm]) is Thermal.FAIR
    assert thermal_from_zones([warm, hot, cool]) is Thermal.SERIOUS
    assert thermal_from_zones([zone(106000, critical=105000)]) is Thermal.CRITICAL
    assert thermal_from_zones([zone(50000)]) is None  # no trip points: says nothing
    assert thermal_from_zones([zone(90000, passive=0)]) is None  # a disabled trip point
    assert thermal_from_zones([]) is None


def write_tree(root: Path, entries: dict[str, dict[str, str]]) -> Path:
    for name, files in entries.items():
        (root / name).mkdir(parents=True)
        for file, content in files.items():
            (root / name / file).write_text(content + "\n")
    return root


async def test_linux_probes_read_sysfs_and_procfs(tmp_path: Path) -> None:
    probes = LinuxProbes(
        power_supplies=write_tree(
            tmp_path / "power_supply",
            {
                "AC": {"type": "Mains", "online": "0"},
                "BAT0": {"type": "Battery", "status": "Discharging"},
            },
        ),
        thermal_zones=write_tree(
            tmp_path / "thermal",
            {
                "thermal_zone0": zone(96000, passive=90000, hot=95000),
                "cooling_device0": {"type": "Fan"},
            },
        ),
        meminfo=DATA / "meminfo.txt",
    )
    assert await probes.on_ac_power() is False
    assert await probes.thermal() is Thermal.SERIOUS
    assert await probes.free_memory() == 21893400 * 1024
    missing = LinuxProbes(
        power_supplies=tmp_path / "none", thermal_zones=tmp_path / "none", meminfo=tmp_path / "none"
    )
    assert (await missing.on_ac_power(), await missing.thermal(), await missing.free_memory()) == (
        None,
        None,
        None,
    )


FAKE_LOGINCTL = """\
#!{python}
import sys, time
if sys.argv[1] == "show-user":
    print("c7")
elif sys.argv[1:3] == ["show-session", "c7"]:
    since = int((time.monotonic() - 400) * 1e6)
    print(f"Type=wayland\\nIdleHint=yes\\nIdleSinceHintMonotonic={{since}}")
else:
    sys.exit(1)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CLOCK_MONOTONIC is Linux's")
async def test_linux_idle_time_through_loginctl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "loginctl"
    fake.write_text(FAKE_LOGINCTL.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("XDG_SESSION_ID", raising=False)
    idle = await LinuxProbes().idle_seconds()
    assert idle is not None and 400 <= idle < 460
    fake.write_text("#!/bin/sh\nexit 1\n")
    assert await LinuxProbes().idle_seconds() is None  # no session: unknown


async def test_a_command_that_hangs_is_killed_at_the_timeout(tmp_path: Path) -> None:
    marker = tmp_path / "still-running"
    script = f"import time, pathlib; time.sleep(2); pathlib.Path({str(marker)!r}).touch()"
    started = trio.current_time()
    assert await command_output(sys.executable, "-c", script, timeout=0.5) is None
    assert trio.current_time() - started < 3
    await trio.sleep(2.5)
    assert not marker.exists()
    assert await command_output(sys.executable, "-c", "print('ok')") == "ok\n"
    assert await command_output(sys.executable, "-c", "raise SystemExit(3)") is None
    assert await command_output(str(tmp_path / "no-such-tool")) is None


async def test_this_machine_answers_every_question_or_says_unknown() -> None:
    readings = await read_all(system_probes())
    assert isinstance(readings, Readings)
    assert readings.idle is None or (readings.idle >= 0 and math.isfinite(readings.idle))
    assert readings.on_ac in (True, False, None)
    assert readings.thermal is None or isinstance(readings.thermal, Thermal)
    assert readings.free_memory is None or readings.free_memory > 0
