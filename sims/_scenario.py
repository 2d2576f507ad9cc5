"""Scenarios: what a simulated network looks like, read strictly from TOML.

A scenario file is input from a researcher's editor, so every mistake (an unknown
key, a share above 1, a region missing from the latency matrix) is reported with
its place in the file as a `ScenarioError`, never as a traceback from deep inside
a run. Every section but `[peers]` has defaults, so a two-line file is a valid run.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from dbloom.api._network import PROVIDERS_TTL, RECORD_TTL
from dbloom.ledger._money import parse_price

from ._devices import DEVICE_CLASSES

MAX_PEERS = 100_000
MAX_DURATION = 7 * 24 * 3600.0
DEFAULT_LOCAL_RTT_MS = 10.0


class ScenarioError(ValueError):
    """A scenario that cannot be run, with where and why."""


@dataclass(frozen=True, slots=True)
class Distribution:
    """A positive quantity drawn per event: `fixed`, `exponential` or `lognormal` about `mean`."""

    kind: str = "fixed"
    mean: float = 1.0
    sigma: float = 0.0
    low: float = 0.0
    high: float = math.inf


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model the network serves: its size (for speeds), prices and share of requests."""

    id: str
    params_b: float
    price_in: int
    price_out: int
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class PeersSpec:
    """Who serves: how many, on what hardware, where, behind NAT or not, how busy at most."""

    count: int
    devices: Mapping[str, float]
    regions: Mapping[str, float]
    nat_share: float = 0.0
    max_batch: int = 4
    max_queue: int = 8
    batch_gain: float = 0.7


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """Latency between regions (round trips in ms, symmetric), bandwidth, relay detour."""

    rtt_ms: Mapping[tuple[str, str], float]
    bandwidth_mbit: float = 50.0
    relay_rtt_ms: float = 30.0
    utc_offset: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AvailabilitySpec:
    """When Macs are idle enough to serve: sessions online and offline, shaped by the day."""

    always_on_share: float = 0.2
    online: Distribution = Distribution("exponential", 7200.0)
    offline: Distribution = Distribution("exponential", 3600.0)
    diurnal_amplitude: float = 0.5
    peak_hour: float = 3.0


@dataclass(frozen=True, slots=True)
class ChurnEvent:
    """At `at` seconds, `share` of the online peers leave at once, back after `back_after`."""

    at: float
    share: float
    back_after: float


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """The clients (each a shim) and the requests they send."""

    clients: int = 10
    rate_per_s: float = 1.0
    regions: Mapping[str, float] = field(default_factory=dict)
    prompt_tokens: Distribution = Distribution("lognormal", 400.0, 0.8, 1, 8192)
    output_tokens: Distribution = Distribution("lognormal", 200.0, 0.6, 1, 4096)
    provider_cache_s: float = PROVIDERS_TTL
    record_cache_s: float = RECORD_TTL
    first_token_timeout: float = 60.0
    max_attempts: int = 3


@dataclass(frozen=True, slots=True)
class AdversarySpec:
    """Shares of peers that cheat, each in one way."""

    invalid_attestation: float = 0.0
    garbage: float = 0.0
    poisoning: float = 0.0
    receipt_inflation: float = 0.0
    inflation_factor: float = 1.5


@dataclass(frozen=True, slots=True)
class KadSpec:
    """Kademlia settings the peers run with (defaults as on real peers)."""

    k: int = 20
    alpha: int = 3
    query_timeout: float = 10.0
    provider_republish: float = 240.0
    provider_ttl: float = 600.0
    record_republish: float = 3600.0
    refresh_interval: float = 600.0
    providers_wanted: int = 20


@dataclass(frozen=True, slots=True)
class LedgerSpec:
    """Who gossips receipts, who keeps a full ledger, how often clients publish."""

    gossip_peers: int = 30
    auditors: int = 3
    batch_seconds: float = 10.0
    epoch_seconds: int = 3600


@dataclass(frozen=True, slots=True)
class Scenario:
    """Everything one run needs; `Scenario.load` reads one, `replace` tweaks it."""

    name: str
    peers: PeersSpec
    description: str = ""
    seed: int = 1
    duration: float = 600.0
    warmup: float = 60.0
    sample_every: float = 10.0
    models: tuple[ModelSpec, ...] = (ModelSpec("llama-8b", 8.0, 50_000, 200_000),)
    network: NetworkSpec = NetworkSpec({})
    availability: AvailabilitySpec = AvailabilitySpec()
    churn_events: tuple[ChurnEvent, ...] = ()
    workload: WorkloadSpec = WorkloadSpec()
    adversaries: AdversarySpec = AdversarySpec()
    kad: KadSpec = KadSpec()
    ledger: LedgerSpec = LedgerSpec()

    @classmethod
    def load(cls, source: str | Path) -> Scenario:
        """A shipped scenario by name (`small`, `planet`…) or a TOML file by path."""
        if isinstance(source, str) and source in shipped_scenarios():
            text = resources.files(__package__).joinpath(f"scenarios/{source}.toml").read_text()
            return cls.from_toml(text, where=f"scenario {source!r}")
        path = Path(source)
        if not path.is_file():
            names = ", ".join(shipped_scenarios())
            raise ScenarioError(f"no scenario file {path} (shipped scenarios: {names})")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ScenarioError(f"cannot read {path}: {e}") from None
        return cls.from_toml(text, where=str(path))

    @classmethod
    def from_toml(cls, text: str, *, where: str = "scenario") -> Scenario:
        """Parse and check a scenario; every problem is a ScenarioError naming its key."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ScenarioError(f"{where}: not valid TOML: {e}") from None
        return from_mapping(data, where=where)

    def with_overrides(
        self, *, peers: int | None = None, duration: float | None = None, seed: int | None = None
    ) -> Scenario:
        """The same scenario at another size, length or seed (for quick looks and sweeps)."""
        out = self
        if peers is not None:
            if not 1 <= peers <= MAX_PEERS:
                raise ScenarioError(f"peers must be within 1..{MAX_PEERS}")
            out = replace(out, peers=replace(out.peers, count=peers))
        if duration is not None:
            if not 0 < duration <= MAX_DURATION:
                raise ScenarioError(f"duration must be within 0..{MAX_DURATION:.0f} seconds")
            out = replace(out, duration=duration)
        if seed is not None:
            out = replace(out, seed=seed)
        return out


def shipped_scenarios() -> list[str]:
    """Names of the scenarios that come with dbloom."""
    folder = resources.files(__package__).joinpath("scenarios")
    names = (p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))
    return sorted(names)


# ---- the checking reader -------------------------------------------------------------------


class _Table:
    """One TOML table being read: every key must be used, every value checked."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ScenarioError(f"{where} must be a table")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def _get(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def has(self, key: str) -> bool:
        return key in self.data

    def number(self, key: str, default: float, low: float = 0.0, high: float = math.inf) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ScenarioError(f"{self.where}.{key} must be a number, not {value!r}")
        if not low <= value <= high:
            raise ScenarioError(f"{self.where}.{key} = {value} is outside {low}..{high}")
        return float(value)

    def integer(self, key: str, default: int, low: int = 0, high: int = 2**31) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{self.where}.{key} must be an integer, not {value!r}")
        if not low <= value <= high:
            raise ScenarioError(f"{self.where}.{key} = {value} is outside {low}..{high}")
        return value

    def text(self, key: str, default: str) -> str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise ScenarioError(f"{self.where}.{key} must be a string, not {value!r}")
        return value

    def table(self, key: str) -> _Table:
        value = self._get(key)
        return _Table({} if value is None else value, f"{self.where}.{key}")

    def shares(
        self, key: str, default: Mapping[str, float], known: set[str] | None = None
    ) -> dict[str, float]:
        """A table of name → weight; weights are normalised to sum to 1."""
        value = self._get(key)
        if value is None:
            return dict(default)
        where = f"{self.where}.{key}"
        if not isinstance(value, dict) or not value:
            raise ScenarioError(f"{where} must be a non-empty table of name = share")
        out: dict[str, float] = {}
        for name, share in value.items():
            if known is not None and name not in known:
                choices = ", ".join(sorted(known))
                raise ScenarioError(f"{where}: unknown {name!r} (known: {choices})")
            if isinstance(share, bool) or not isinstance(share, int | float) or not share >= 0:
                raise ScenarioError(f"{where}.{name} must be a share >= 0, not {share!r}")
            out[name] = float(share)
        total = sum(out.values())
        if not total > 0 or math.isinf(total):
            raise ScenarioError(f"{where}: the shares must add up to more than 0")
        return {name: share / total for name, share in out.items()}

    def distribution(self, key: str, default: Distribution) -> Distribution:
        if not self.has(key):
            self.used.add(key)
            return default
        t = self.table(key)
        kind = t.text("dist", default.kind)
        if kind not in ("fixed", "exponential", "lognormal"):
            raise ScenarioError(f"{t.where}.dist must be fixed, exponential or lognormal")
        dist = Distribution(
            kind,
            t.number("mean", default.mean, 1e-9, 1e12),
            t.number("sigma", default.sigma, 0.0, 10.0),
            t.number("min", default.low, 0.0, 1e12),
            t.number("max", default.high, 0.0, math.inf),
        )
        t.done()
        if dist.low > dist.high:
            raise ScenarioError(f"{t.where}: min is above max")
        return dist

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ScenarioError(f"{self.where}: unknown key(s) {', '.join(map(repr, unknown))}")


def _pair(name: str, where: str) -> tuple[str, str]:
    parts = name.split("-")
    if len(parts) != 2 or not all(parts):
        raise ScenarioError(f"{where}: {name!r} must name two regions as 'a-b'")
    a, b = parts
    return (a, b) if a <= b else (b, a)


def from_mapping(data: Mapping[str, Any], *, where: str = "scenario") -> Scenario:
    """A Scenario from parsed TOML (a dict); ScenarioError for anything wrong."""
    root = _Table(dict(data), where)
    name = root.text("name", "") or "unnamed"
    description = root.text("description", "")
    seed = root.integer("seed", 1, 0, 2**63)
    duration = root.number("duration", 600.0, 1.0, MAX_DURATION)
    warmup = root.number("warmup", 60.0, 0.0, MAX_DURATION)
    sample_every = root.number("sample_every", 10.0, 0.1, MAX_DURATION)

    p = root.table("peers")
    if not p.has("count"):
        raise ScenarioError(f"{p.where}.count is required")
    count = p.integer("count", 0, 1, MAX_PEERS)
    devices = p.shares("devices", {"M1": 0.3, "M2": 0.3, "M3": 0.2, "M4": 0.2}, set(DEVICE_CLASSES))
    regions = p.shares("regions", {"eu": 1.0})
    peers = PeersSpec(
        count=count,
        devices=devices,
        regions=regions,
        nat_share=p.number("nat_share", 0.0, 0.0, 1.0),
        max_batch=p.integer("max_batch", 4, 1, 256),
        max_queue=p.integer("max_queue", 8, 0, 4096),
        batch_gain=p.number("batch_gain", 0.7, 0.0, 1.0),
    )
    p.done()

    models_raw = root._get("models")
    models: tuple[ModelSpec, ...] = (ModelSpec("llama-8b", 8.0, 50_000, 200_000),)
    if models_raw is not None:
        if not isinstance(models_raw, list) or not models_raw:
            raise ScenarioError(f"{where}.models must be a non-empty array of tables")
        parsed = []
        for i, raw in enumerate(models_raw):
            m = _Table(raw, f"{where}.models[{i}]")
            model_id = m.text("id", "")
            if not model_id or len(model_id) > 128:
                raise ScenarioError(f"{m.where}.id must be a name of 1..128 characters")
            try:
                price_in = parse_price(m.text("price_in", "0.05"))
                price_out = parse_price(m.text("price_out", "0.20"))
            except ValueError as e:
                raise ScenarioError(f"{m.where}: {e}") from None
            parsed.append(
                ModelSpec(
                    model_id,
                    m.number("params_b", 8.0, 0.01, 2000.0),
                    price_in,
                    price_out,
                    m.number("weight", 1.0, 0.0, 1e6),
                )
            )
            m.done()
        if len({m.id for m in parsed}) != len(parsed):
            raise ScenarioError(f"{where}.models: two models share an id")
        if not sum(m.weight for m in parsed) > 0:
            raise ScenarioError(f"{where}.models: the weights must add up to more than 0")
        models = tuple(parsed)

    n = root.table("network")
    rtt: dict[tuple[str, str], float] = {}
    matrix = n.table("rtt_ms")
    for key in list(matrix.data):
        rtt[_pair(key, matrix.where)] = matrix.number(key, 0.0, 0.0, 10_000.0)
    matrix.done()
    offsets = n.table("utc_offset")
    utc_offset = {region: offsets.number(region, 0.0, -12.0, 14.0) for region in list(offsets.data)}
    offsets.done()
    network = NetworkSpec(
        rtt_ms=rtt,
        utc_offset=utc_offset,
        bandwidth_mbit=n.number("bandwidth_mbit", 50.0, 0.01, 1e6),
        relay_rtt_ms=n.number("relay_rtt_ms", 30.0, 0.0, 10_000.0),
    )
    n.done()

    a = root.table("availability")
    defaults = AvailabilitySpec()
    availability = AvailabilitySpec(
        always_on_share=a.number("always_on_share", defaults.always_on_share, 0.0, 1.0),
        online=a.distribution("online", defaults.online),
        offline=a.distribution("offline", defaults.offline),
        diurnal_amplitude=a.number("diurnal_amplitude", defaults.diurnal_amplitude, 0.0, 0.95),
        peak_hour=a.number("peak_hour", defaults.peak_hour, 0.0, 24.0),
    )
    a.done()

    events_raw = root._get("churn_events") or []
    if not isinstance(events_raw, list):
        raise ScenarioError(f"{where}.churn_events must be an array of tables")
    events = []
    for i, raw in enumerate(events_raw):
        ev = _Table(raw, f"{where}.churn_events[{i}]")
        events.append(
            ChurnEvent(
                ev.number("at", 0.0, 0.0, MAX_DURATION),
                ev.number("share", 0.1, 0.0, 1.0),
                ev.number("back_after", 600.0, 0.0, MAX_DURATION),
            )
        )
        ev.done()

    w = root.table("workload")
    wd = WorkloadSpec()
    workload = WorkloadSpec(
        clients=w.integer("clients", wd.clients, 1, 100_000),
        rate_per_s=w.number("rate_per_s", wd.rate_per_s, 0.0, 10_000.0),
        regions=w.shares("regions", regions),
        prompt_tokens=w.distribution("prompt_tokens", wd.prompt_tokens),
        output_tokens=w.distribution("output_tokens", wd.output_tokens),
        provider_cache_s=w.number("provider_cache_s", wd.provider_cache_s, 0.0, 86_400.0),
        record_cache_s=w.number("record_cache_s", wd.record_cache_s, 0.0, 86_400.0),
        first_token_timeout=w.number("first_token_timeout", wd.first_token_timeout, 0.1, 3600.0),
        max_attempts=w.integer("max_attempts", wd.max_attempts, 1, 20),
    )
    w.done()

    adv = root.table("adversaries")
    adversaries = AdversarySpec(
        invalid_attestation=adv.number("invalid_attestation", 0.0, 0.0, 1.0),
        garbage=adv.number("garbage", 0.0, 0.0, 1.0),
        poisoning=adv.number("poisoning", 0.0, 0.0, 1.0),
        receipt_inflation=adv.number("receipt_inflation", 0.0, 0.0, 1.0),
        inflation_factor=adv.number("inflation_factor", 1.5, 1.0, 100.0),
    )
    adv.done()
    shares = (
        adversaries.invalid_attestation
        + adversaries.garbage
        + adversaries.poisoning
        + adversaries.receipt_inflation
    )
    if shares > 1.0 + 1e-9:
        raise ScenarioError(f"{adv.where}: the adversary shares add up to {shares:.2f} > 1")

    k = root.table("kad")
    kd = KadSpec()
    kad = KadSpec(
        k=k.integer("k", kd.k, 1, 64),
        alpha=k.integer("alpha", kd.alpha, 1, 64),
        query_timeout=k.number("query_timeout", kd.query_timeout, 0.01, 600.0),
        provider_republish=k.number("provider_republish", kd.provider_republish, 1.0, 86_400.0),
        provider_ttl=k.number("provider_ttl", kd.provider_ttl, 1.0, 7 * 86_400.0),
        record_republish=k.number("record_republish", kd.record_republish, 1.0, 7 * 86_400.0),
        refresh_interval=k.number("refresh_interval", kd.refresh_interval, 1.0, 7 * 86_400.0),
        providers_wanted=k.integer("providers_wanted", kd.providers_wanted, 1, 200),
    )
    k.done()

    lg = root.table("ledger")
    ld = LedgerSpec()
    ledger = LedgerSpec(
        gossip_peers=lg.integer("gossip_peers", ld.gossip_peers, 0, MAX_PEERS),
        auditors=lg.integer("auditors", ld.auditors, 0, 64),
        batch_seconds=lg.number("batch_seconds", ld.batch_seconds, 0.1, 86_400.0),
        epoch_seconds=lg.integer("epoch_seconds", ld.epoch_seconds, 60, 7 * 86_400),
    )
    lg.done()
    if ledger.auditors > ledger.gossip_peers:
        raise ScenarioError(
            f"{lg.where}: auditors ({ledger.auditors}) must be among the "
            f"gossip_peers ({ledger.gossip_peers})"
        )
    root.done()

    all_regions = set(peers.regions) | set(workload.regions)
    for a_region in all_regions:
        for b_region in all_regions:
            pair = (a_region, b_region) if a_region <= b_region else (b_region, a_region)
            if pair not in rtt:
                if a_region != b_region:
                    raise ScenarioError(
                        f"{where}.network.rtt_ms has no round trip for '{pair[0]}-{pair[1]}'"
                    )
                rtt[pair] = DEFAULT_LOCAL_RTT_MS
    return Scenario(
        name=name,
        description=description,
        seed=seed,
        duration=duration,
        warmup=warmup,
        sample_every=sample_every,
        peers=peers,
        models=models,
        network=network,
        availability=availability,
        churn_events=tuple(events),
        workload=workload,
        adversaries=adversaries,
        kad=kad,
        ledger=ledger,
    )
