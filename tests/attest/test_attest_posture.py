"""Posture readers (against recorded command output) and the software measurement."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dbloom.attest import measure_software
from dbloom.attest._posture import parse_csrutil, parse_efi_secure_boot, parse_secure_boot_policy

CSRUTIL_ENABLED = "System Integrity Protection status: enabled.\n"
CSRUTIL_DISABLED = "System Integrity Protection status: disabled.\n"
CSRUTIL_CUSTOM = textwrap.dedent(
    """\
    System Integrity Protection status: unknown (Custom Configuration).

    Configuration:
    \tApple Internal: disabled
    \tKext Signing: enabled
    \tFilesystem Protections: disabled
    \tDebugging Restrictions: enabled
    \tDTrace Restrictions: enabled
    \tNVRAM Protections: enabled
    \tBaseSystem Verification: enabled

    This is an unsupported configuration, likely to break in the future and leave your machine \
in an unknown state.
    """
)
BPUTIL_FULL = textwrap.dedent(
    """\
    Current local policy:
    OS environment:
    OS Type                                       : macOS
    OS Pairing Status                             : Paired
    Security Mode: Full (smb0: absent)
    3rd Party Kexts Status: Disabled (smb2: absent)
    """
)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (CSRUTIL_ENABLED, True),
        (CSRUTIL_DISABLED, False),
        (CSRUTIL_CUSTOM, False),
        ("csrutil: command not found", None),
        ("", None),
    ],
)
def test_sip_from_csrutil(output: str, expected: bool | None) -> None:
    assert parse_csrutil(output) is expected


def test_secure_boot_parsers() -> None:
    assert parse_secure_boot_policy(BPUTIL_FULL) is True
    assert parse_secure_boot_policy(BPUTIL_FULL.replace("Full", "Reduced")) is False
    assert parse_secure_boot_policy("nothing here") is None
    assert parse_efi_secure_boot(b"\x06\x00\x00\x00\x01") is True
    assert parse_efi_secure_boot(b"\x06\x00\x00\x00\x00") is False
    assert parse_efi_secure_boot(b"\x06") is None


def test_hardening_denies_debuggers_and_core_dumps() -> None:
    """In a child process: hardening is irreversible and must not touch the test runner."""
    code = textwrap.dedent(
        """
        from dbloom.attest import harden_process, read_posture
        before = read_posture()
        after = harden_process()
        print(before.core_dumps_off, after.core_dumps_off, after.debugger_denied, after.sip)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out[1] == "True"
    if sys.platform.startswith("linux"):
        assert out[2] == "True" and out[3] == "None"


def test_measurement_is_deterministic_across_processes() -> None:
    here = measure_software()
    code = "from dbloom.attest import measure_software; print(measure_software().hex)"
    there = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert there == here.hex and len(here.digest) == 32
    assert here.files > 50 and set(here.runtime) == {"mlx", "mlx-lm"}
