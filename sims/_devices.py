"""Apple Silicon device classes and the speeds the simulator gives them.

The figures live in `devices.toml` beside this module, with their sources.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Final


@dataclass(frozen=True, slots=True)
class DeviceClass:
    """One chip configuration, as measured on the reference model."""

    name: str
    decode_tps: float
    prefill_tps: float
    bandwidth_gbs: float
    memory_gb: float

    def speeds(self, params_b: float) -> tuple[float, float]:
        """(decode, prefill) tokens per second for a model of `params_b` billion parameters."""
        scale = REFERENCE_PARAMS_B / params_b
        return self.decode_tps * scale, self.prefill_tps * scale


def _load() -> tuple[float, dict[str, DeviceClass]]:
    table = tomllib.loads(resources.files(__package__).joinpath("devices.toml").read_text())
    classes = {
        name: DeviceClass(
            name,
            float(row["decode_tps"]),
            float(row["prefill_tps"]),
            float(row["bandwidth_gbs"]),
            float(row["memory_gb"]),
        )
        for name, row in table["classes"].items()
    }
    return float(table["reference_params_b"]), classes


_TABLE = _load()
REFERENCE_PARAMS_B: Final = _TABLE[0]
DEVICE_CLASSES: Final = _TABLE[1]
