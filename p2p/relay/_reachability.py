"""Are we reachable from outside? A verdict from dial-back answers, sans-IO.

One successful dial-back proves we are public. A failure may be the server's own
network, so we call ourselves private only after `confidence` different servers
failed to reach us in a row; refusals (busy, bad request) say nothing either way.
"""

from __future__ import annotations

import enum

from .._identity import PeerId
from .._multiaddr import Multiaddr
from ._autonat import DialResponse, DialStatus

DEFAULT_CONFIDENCE = 2


class Reachability(enum.Enum):
    """What we know about being dialable."""

    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


class ReachabilityTracker:
    """Folds dial-back answers into a verdict."""

    def __init__(self, *, confidence: int = DEFAULT_CONFIDENCE) -> None:
        self.confidence = confidence
        self.status = Reachability.UNKNOWN
        self.public_addr: Multiaddr | None = None
        self._failed_by: set[PeerId] = set()

    def record(self, server: PeerId, response: DialResponse) -> Reachability:
        """Take one server's answer; returns the verdict after it."""
        if response.status is DialStatus.OK:
            self.status = Reachability.PUBLIC
            self.public_addr = response.addr
            self._failed_by.clear()
        elif response.status is DialStatus.E_DIAL_ERROR:
            self._failed_by.add(server)
            if len(self._failed_by) >= self.confidence:
                self.status = Reachability.PRIVATE
                self.public_addr = None
        return self.status

    def unlistened(self) -> Reachability:
        """We listen nowhere, so nobody can dial us: private without asking."""
        self.status = Reachability.PRIVATE
        self.public_addr = None
        return self.status
