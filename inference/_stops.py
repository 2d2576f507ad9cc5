"""Stop strings over streamed text, never leaking a partial match.

Text arrives a token at a time, and a stop string can span tokens. `StopBuffer` emits
only text that cannot be the start of a stop string and holds the rest back until the
next piece decides it. Pure and synchronous, so it is tested without a model.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopBuffer:
    """Feed decoded text; get back what is safe to emit and whether a stop matched."""

    __slots__ = ("_held", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(stops)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return `(emit, stopped)`; after a stop, `emit` is the text before it."""
        if not self._stops:
            return text, False
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        keep = self._longest_pending_prefix(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release held text once generation ended without a stop."""
        held, self._held = self._held, ""
        return held

    def _longest_pending_prefix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that begins some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
