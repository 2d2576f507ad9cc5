"""Scenario files: shipped ones load, mistakes are named, hostile input never crashes."""

from __future__ import annotations

import contextlib
import math
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbloom.sims import DEVICE_CLASSES, Scenario, ScenarioError, shipped_scenarios

MINIMAL = "[peers]\ncount = 10\n"


def test_every_shipped_scenario_loads_and_says_what_it_shows() -> None:
    names = shipped_scenarios()
    assert {"small", "city", "planet", "sybil", "churn-storm"} <= set(names)
    for name in names:
        scenario = Scenario.load(name)
        assert scenario.name == name
        assert len(scenario.description.split()) > 15


def test_planet_is_ten_thousand_peers_for_an_hour() -> None:
    planet = Scenario.load("planet")
    assert planet.peers.count == 10_000
    assert planet.duration == 3600


def test_a_two_line_file_is_a_scenario_with_defaults() -> None:
    scenario = Scenario.from_toml(MINIMAL)
    assert scenario.peers.count == 10
    assert math.isclose(sum(scenario.peers.devices.values()), 1.0)
    assert scenario.network.rtt_ms[("eu", "eu")] > 0


def test_shares_are_normalised() -> None:
    scenario = Scenario.from_toml('[peers]\ncount = 5\ndevices = { "M1" = 3, "M4" = 1 }\n')
    assert scenario.peers.devices == {"M1": 0.75, "M4": 0.25}


def test_prices_are_exact_micro_units() -> None:
    scenario = Scenario.from_toml(
        MINIMAL + '[[models]]\nid = "m"\nprice_in = "0.10"\nprice_out = "1.5"\n'
    )
    assert (scenario.models[0].price_in, scenario.models[0].price_out) == (100_000, 1_500_000)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[peers]\n", "peers.count is required"),
        ("[peers]\ncount = 0\n", "peers.count = 0 is outside"),
        (MINIMAL + "colour = 1\n", "unknown key(s) 'colour'"),
        (MINIMAL + "[workload]\nrate = 3\n", "workload: unknown key(s) 'rate'"),
        ('[peers]\ncount = 3\ndevices = { "M9" = 1 }\n', "unknown 'M9'"),
        ("[peers]\ncount = 3\nregions = { eu = 1, us = 1 }\n", "no round trip for 'eu-us'"),
        (MINIMAL + "[adversaries]\npoisoning = 0.7\ngarbage = 0.5\n", "add up to 1.20"),
        (MINIMAL + "[ledger]\ngossip_peers = 2\nauditors = 3\n", "must be among"),
        (MINIMAL + '[workload]\noutput_tokens = { dist = "cauchy" }\n', "dist must be"),
        (MINIMAL + '[[models]]\nid = "m"\nprice_in = "cheap"\n', "models[0]"),
        (MINIMAL + "[[models]]\nid = 'a'\n[[models]]\nid = 'a'\n", "share an id"),
        ("peers = [", "not valid TOML"),
        ("duration = true\n" + MINIMAL, "duration must be a number"),
        (MINIMAL + "[network]\nrtt_ms = { europe = 5 }\n", "two regions as 'a-b'"),
    ],
)
def test_mistakes_are_named(text: str, message: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        Scenario.from_toml(text, where="my.toml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("my.toml")


def test_a_missing_file_names_the_shipped_scenarios(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ScenarioError, match="shipped scenarios: churn-storm"):
        Scenario.load(tmp_path / "nope.toml")


def test_overrides_are_checked() -> None:
    small = Scenario.load("small")
    assert small.with_overrides(peers=7, duration=5, seed=9).peers.count == 7
    with pytest.raises(ScenarioError):
        small.with_overrides(peers=0)
    with pytest.raises(ScenarioError):
        small.with_overrides(duration=-1)


def test_device_table_scales_with_model_size() -> None:
    m1 = DEVICE_CLASSES["M1"]
    decode_7b, prefill_7b = m1.speeds(7.0)
    decode_14b, _ = m1.speeds(14.0)
    assert decode_7b == m1.decode_tps and prefill_7b == m1.prefill_tps
    assert decode_14b == pytest.approx(decode_7b / 2)
    assert DEVICE_CLASSES["M4 Max"].decode_tps > DEVICE_CLASSES["M4"].decode_tps


toml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
sections = [
    "peers",
    "network",
    "availability",
    "workload",
    "adversaries",
    "kad",
    "ledger",
    "models",
    "churn_events",
    "seed",
    "duration",
    "name",
]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sections) | st.text(max_size=6), toml_values, max_size=6))
def test_any_structure_gives_a_scenario_or_a_scenario_error(data: dict[str, object]) -> None:
    from dbloom.sims._scenario import from_mapping

    with contextlib.suppress(ScenarioError):
        from_mapping(data)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {"count": st.integers(-5, 200_000)},
        optional={
            "nat_share": st.floats(allow_nan=True),
            "max_batch": st.integers(-2, 1000),
            "devices": st.dictionaries(
                st.sampled_from([*DEVICE_CLASSES, "x"]),
                st.floats(allow_nan=True) | st.integers(),
                max_size=3,
            ),
            "regions": st.dictionaries(st.text(max_size=4), st.floats(-1, 1e300), max_size=3),
        },
    )
)
def test_near_valid_peer_tables_never_escape_as_other_errors(peers: dict[str, object]) -> None:
    from dbloom.sims._scenario import from_mapping

    with contextlib.suppress(ScenarioError):
        from_mapping({"peers": peers})


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_a_scenario_or_a_scenario_error(text: str) -> None:
    with contextlib.suppress(ScenarioError):
        Scenario.from_toml(text)


def test_shipped_files_are_plain_toml() -> None:
    from importlib import resources

    folder = resources.files("dbloom.sims").joinpath("scenarios")
    for name in shipped_scenarios():
        tomllib.loads(folder.joinpath(f"{name}.toml").read_text())
