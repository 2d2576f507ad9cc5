"""The availability policy as a pure state machine: explicit readings, explicit `now`."""

from __future__ import annotations

from dataclasses import replace
from datetime import time

import pytest

from dbloom.cli._availability import (
    Availability,
    Decision,
    Readings,
    Rules,
    Thermal,
    evaluate,
    parse_hours,
)

GIB = 2**30
AWAY = Readings(
    clock=time(23, 30),
    idle=3600.0,
    on_ac=True,
    thermal=Thermal.NOMINAL,
    free_memory=8 * GIB,
)
RULES = Rules(idle_minutes=5, memory_need=2 * GIB, settle=30)


def states(decision: Decision) -> dict[str, str]:
    return {c.name: c.state for c in decision.checks}


def test_serves_at_once_when_every_condition_holds_at_start() -> None:
    decision = Availability(RULES).update(AWAY, now=0.0)
    assert decision.serve and decision.reasons == () and decision.unknown == ()
    assert states(decision) == {"idle": "ok", "power": "ok", "thermal": "ok", "memory": "ok"}
    assert decision.summary() == "serving"


def test_owner_active_then_idle_then_back() -> None:
    policy = Availability(RULES)
    present = policy.update(replace(AWAY, idle=12.0), now=0.0)
    assert not present.serve
    assert present.reasons == ("owner active 12 s ago (serves after 5 min)",)
    # idle long enough: the conditions must still hold for `settle` seconds
    waiting = policy.update(replace(AWAY, idle=300.0), now=288.0)
    assert not waiting.serve and "serving again in 30 s" in waiting.reasons[0]
    assert not policy.update(replace(AWAY, idle=329.0), now=317.0).serve
    back = policy.update(replace(AWAY, idle=330.0), now=318.0)
    assert back.serve and back.checks[0].text == "owner idle for 6 min"
    # the owner returns: paused on the very sample that shows input
    returned = policy.update(replace(AWAY, idle=0.4), now=319.0)
    assert not returned.serve and returned.reasons[0].startswith("owner active 0 s ago")


def test_battery_pauses_unless_allowed() -> None:
    on_battery = replace(AWAY, on_ac=False)
    decision = Availability(RULES).update(on_battery, now=0.0)
    assert not decision.serve and decision.reasons == ("on battery power",)
    allowed = Availability(replace(RULES, serve_on_battery=True)).update(on_battery, now=0.0)
    assert allowed.serve and "on battery power (allowed)" in [c.text for c in allowed.checks]


def test_heat_pauses_until_nominal_for_the_settle_time() -> None:
    policy = Availability(RULES)
    assert policy.update(AWAY, now=0.0).serve
    for state in (Thermal.FAIR, Thermal.SERIOUS, Thermal.CRITICAL):
        hot = policy.update(replace(AWAY, thermal=state), now=10.0)
        assert not hot.serve and hot.reasons == (f"thermal state {state} (serves when nominal)",)
    assert not policy.update(AWAY, now=20.0).serve
    assert not policy.update(AWAY, now=49.9).serve
    assert policy.update(AWAY, now=50.0).serve


def test_low_memory_pauses_and_a_hovering_reading_never_flaps() -> None:
    policy = Availability(RULES)
    low = policy.update(replace(AWAY, free_memory=GIB), now=0.0)
    assert not low.serve
    assert low.reasons == ("only 1.0 GiB free; the models need 2.0 GiB",)
    # free memory hovering around the need: never serves, never announces and withdraws
    for step in range(1, 20):
        free = 3 * GIB if step % 2 else GIB
        assert not policy.update(replace(AWAY, free_memory=free), now=step * 5.0).serve


def test_owner_active_on_battery_and_hot_lists_every_reason() -> None:
    decision = Availability(RULES).update(
        replace(AWAY, idle=2.0, on_ac=False, thermal=Thermal.SERIOUS), now=0.0
    )
    assert not decision.serve and len(decision.reasons) == 3
    assert decision.summary().startswith("paused: owner active 2 s ago")


def test_unknown_readings_do_not_block_but_are_named() -> None:
    decision = Availability(RULES).update(Readings(clock=time(12, 0)), now=0.0)
    assert decision.serve and decision.reasons == ()
    assert set(states(decision).values()) == {"unknown"}
    assert decision.unknown == (
        "idle time unknown here: not checked",
        "power source unknown here: not checked",
        "thermal state unknown here: not checked",
        "free memory unknown here: not checked",
    )
    assert "idle time unknown here: not checked" in decision.summary()


def test_serving_hours_across_midnight() -> None:
    rules = replace(RULES, hours=parse_hours("22:00-07:00"))
    policy = Availability(rules)
    assert policy.update(replace(AWAY, clock=time(6, 59)), now=0.0).serve
    morning = policy.update(replace(AWAY, clock=time(7, 0)), now=60.0)
    assert morning.reasons == ("outside serving hours 22:00-07:00 (now 07:00)",)
    assert not policy.update(replace(AWAY, clock=time(22, 0)), now=61.0).serve
    assert policy.update(replace(AWAY, clock=time(22, 1)), now=91.0).serve


def test_always_on_ignores_everything() -> None:
    decision = Availability(Rules(always_on=True)).update(
        replace(AWAY, idle=0.0, on_ac=False, thermal=Thermal.CRITICAL, free_memory=0), now=0.0
    )
    assert decision.serve and [c.name for c in decision.checks] == ["always-on"]


def test_idle_minutes_zero_skips_the_idle_check() -> None:
    checks = evaluate(replace(RULES, idle_minutes=0), replace(AWAY, idle=0.0))
    assert "idle" not in {c.name for c in checks}


@pytest.mark.parametrize(
    ("text", "inside", "outside"),
    [
        ("22:00-07:00", [time(23, 0), time(0, 0), time(6, 59)], [time(7, 0), time(12, 0)]),
        ("9:00-12:00, 13:00-17:30", [time(9, 0), time(17, 29)], [time(12, 30), time(17, 30)]),
        ("00:00-24:00", [time(0, 0), time(23, 59)], []),
    ],
)
def test_hours_parse_and_contain(text: str, inside: list[time], outside: list[time]) -> None:
    hours = parse_hours(text)
    assert all(hours.contains(t) for t in inside)
    assert not any(hours.contains(t) for t in outside)
    assert parse_hours(str(hours)) == hours


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("25:00-07:00", "25:00 is not a time of day"),
        ("22:60-07:00", "22:60 is not a time of day"),
        ("24:00-07:00", "24:00 is not a time of day"),
        ("22:00", "is not a range like 22:00-07:00"),
        ("nights", "is not a range like 22:00-07:00"),
        ("10:00-10:00", "is empty"),
        ("22:00-07:00,", "'' is not a range"),
    ],
)
def test_bad_hours_say_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_hours(text)


def test_rules_refuse_negative_values() -> None:
    with pytest.raises(ValueError):
        Rules(idle_minutes=-1)
