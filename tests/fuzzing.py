"""Hypothesis strategies shared by the decoder tests (a uniquely named module: tests/ is no package)."""

from __future__ import annotations

from hypothesis import strategies as st


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Valid bytes with a flipped byte, truncated, extended, or spliced — or random bytes."""
    if not valid:
        return st.binary(max_size=64)
    index = st.integers(0, len(valid) - 1)
    return st.one_of(
        st.binary(max_size=256),
        st.builds(lambda i, b: valid[:i] + bytes([b]) + valid[i + 1 :], index, st.integers(0, 255)),
        st.builds(lambda i: valid[:i], index),
        st.builds(lambda extra: valid + extra, st.binary(min_size=1, max_size=32)),
        st.builds(lambda i, junk: valid[:i] + junk + valid[i:], index, st.binary(max_size=16)),
    )
