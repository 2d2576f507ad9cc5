"""The namespace lab every test here builds on, removed even when a test fails."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from test_relay_netns import IP, IPTABLES, TCPDUMP, Lab


@pytest.fixture
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for tool in (IP, IPTABLES, TCPDUMP):
        if not os.access(tool, os.X_OK):
            pytest.skip(f"{tool} is missing")
    lab = Lab()
    try:
        try:
            lab.add_ns("pub")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot create a network namespace: {exc.stderr.decode().strip()}")
        yield lab
    finally:
        lab.close()
