"""The macOS parsers against command output captured on real Macs and published publicly.

Each file in data/real/ is quoted from a public source (see data/real/README.md); the
expected values here are worked out by hand from the numbers printed in those files, not
by running the parser, so a parser that misreads a real format fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dbloom.cli._availability import Thermal
from dbloom.cli._probes import (
    parse_hid_idle,
    parse_pmset_batt,
    parse_thermal_pressure,
    parse_vm_stat,
)

REAL = Path(__file__).parent / "data" / "real"


def captured(name: str) -> str:
    return (REAL / name).read_text(encoding="utf-8")


# ---- ioreg: HIDIdleTime is in nanoseconds ------------------------------------------------


@pytest.mark.parametrize(
    ("name", "idle_ns"),
    [
        ("ioreg_hidsystem_macmini_tree.txt", 40165394),
        ("ioreg_hidsystem_macmini_grep.txt", 31068206),
    ],
)
def test_idle_seconds_from_real_ioreg(name: str, idle_ns: int) -> None:
    text = captured(name)
    assert text.count('"HIDIdleTime" = ') == 1
    assert f'"HIDIdleTime" = {idle_ns}\n' in text
    assert parse_hid_idle(text) == pytest.approx(idle_ns / 1_000_000_000, abs=1e-12)


# ---- pmset -g batt: AC or not ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "on_ac"),
    [
        ("pmset_batt_ac_not_charging_m1.txt", True),
        ("pmset_batt_ac_charging_2016.txt", True),
        ("pmset_batt_ac_loose_cable_2015.txt", True),
        ("pmset_batt_desktop_imac.txt", True),
        ("pmset_batt_battery_2019.txt", False),
        ("pmset_batt_battery_no_estimate_elcapitan.txt", False),
    ],
)
def test_power_source_from_real_pmset(name: str, on_ac: bool) -> None:
    text = captured(name)
    source = "AC Power" if on_ac else "Battery Power"
    assert text.startswith(f"Now drawing from '{source}'\n")
    assert parse_pmset_batt(text) is on_ac


# ---- notifyutil: the thermal pressure level ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "thermal"),
    [
        ("notifyutil_thermal_moderate_m4air.txt", Thermal.FAIR),  # level 1, Moderate
    ],
)
def test_thermal_state_from_real_notifyutil(name: str, thermal: Thermal) -> None:
    assert parse_thermal_pressure(captured(name)) is thermal


# ---- vm_stat: free + inactive + speculative pages, times the page size ---------------------
# vm_stat prints "Pages free" as the kernel's free count minus the speculative count, so
# adding the speculative line back counts no page twice.


@pytest.mark.parametrize(
    ("name", "page_size", "free", "inactive", "speculative"),
    [
        ("vm_stat_intel_wazuh.txt", 4096, 6127229, 628646, 430715),
        ("vm_stat_apple_silicon_hmcl_head.txt", 16384, 3857, 443760, 1075),
        ("vm_stat_snow_leopard.txt", 4096, 90518, 32417, 134461),
    ],
)
def test_available_memory_from_real_vm_stat(
    name: str, page_size: int, free: int, inactive: int, speculative: int
) -> None:
    text = captured(name)
    assert f"(page size of {page_size} bytes)" in text
    for label, pages in (("free", free), ("inactive", inactive), ("speculative", speculative)):
        assert f"Pages {label}:" in text and f" {pages}.\n" in text
    assert parse_vm_stat(text) == (free + inactive + speculative) * page_size


def test_vm_stat_excerpt_without_inactive_or_speculative_is_unknown() -> None:
    # Published trimmed: only free, compressor and swap lines survive. Free pages alone
    # would understate what is available, so the parser must not answer.
    text = captured("vm_stat_m4air_excerpt_mbcheck.txt")
    assert "Pages inactive" not in text and "Pages speculative" not in text
    assert parse_vm_stat(text) is None


def test_available_memory_from_tiger_vm_stat_without_speculative_line() -> None:
    text = captured("vm_stat_tiger.txt")
    assert "Pages speculative" not in text
    assert parse_vm_stat(text) == (18150 + 79964) * 4096
