"""`dbloom sim`: the network at scale, in virtual time, on the real protocol cores.

from dbloom.sims import Scenario, run
result = run(Scenario.load("small").with_overrides(duration=300), out="runs/small")
result.metrics["dht"]["lookups"]["providers"]["success"]
"""

from ._devices import DEVICE_CLASSES as DEVICE_CLASSES
from ._devices import DeviceClass as DeviceClass
from ._run import Result as Result
from ._run import run as run
from ._scenario import Scenario as Scenario
from ._scenario import ScenarioError as ScenarioError
from ._scenario import shipped_scenarios as shipped_scenarios
