"""The node's security posture: read what can be read, lock down what can be locked.

Each value is True, False or None, and None means "could not be read here", never a
guess: a client that requires SIP refuses a node that cannot show it. The macOS readers
parse command output; the parsers are pure so they are tested against recorded output.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
import subprocess
import sys
from pathlib import Path

from ._evidence import Posture

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PT_DENY_ATTACH = 31
EFI_SECURE_BOOT = Path("/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c")
COMMAND_TIMEOUT = 5.0


def parse_csrutil(output: str) -> bool | None:
    """SIP from `csrutil status`; a custom configuration counts as off."""
    for line in output.splitlines():
        if line.startswith("System Integrity Protection status:"):
            status = line.split(":", 1)[1].strip().rstrip(".").lower()
            if status == "enabled":
                return True
            if status.startswith("disabled") or status.startswith("unknown"):
                return False
    return None


def parse_secure_boot_policy(output: str) -> bool | None:
    """Full Security from `bputil -d` (Apple silicon); reduced or permissive counts as off."""
    for line in output.splitlines():
        stripped = line.strip()
        if stripped.startswith("Security Mode:"):
            mode = stripped.split(":", 1)[1].strip().lower()
            return mode.startswith("full")
    return None


def parse_efi_secure_boot(data: bytes) -> bool | None:
    """Linux efivar: 4 attribute bytes, then one byte that is 1 when Secure Boot is on."""
    if len(data) != 5:
        return None
    return data[4] == 1


def _run(*command: str) -> str | None:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _read_sip() -> bool | None:
    if sys.platform != "darwin":
        return None
    output = _run("/usr/bin/csrutil", "status")
    return None if output is None else parse_csrutil(output)


def _read_secure_boot() -> bool | None:
    if sys.platform == "darwin":
        output = _run("/usr/bin/bputil", "-d")
        return None if output is None else parse_secure_boot_policy(output)
    try:
        return parse_efi_secure_boot(EFI_SECURE_BOOT.read_bytes())
    except OSError:
        return None


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def deny_debugger() -> bool | None:
    """Forbid debuggers from attaching to this process: PT_DENY_ATTACH or PR_SET_DUMPABLE 0."""
    libc = _libc()
    if libc is None:
        return None
    if sys.platform == "darwin":
        return bool(libc.ptrace(PT_DENY_ATTACH, 0, None, 0) == 0)
    if sys.platform.startswith("linux"):
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            return False
        return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)
    return None


def disable_core_dumps() -> bool:
    """Core files would hold prompts; set the core size limit to zero."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as e:
        log.warning("could not disable core dumps: %s", e)
    return resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)


def harden_process() -> Posture:
    """Lock this process down (node processes call it once at start) and report the posture."""
    return Posture(
        sip=_read_sip(),
        secure_boot=_read_secure_boot(),
        debugger_denied=deny_debugger(),
        core_dumps_off=disable_core_dumps(),
    )


def read_posture() -> Posture:
    """Report the posture without changing anything (for `dbloom attest measure`)."""
    dumpable = None
    libc = _libc()
    if libc is not None and sys.platform.startswith("linux"):
        dumpable = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0
    return Posture(
        sip=_read_sip(),
        secure_boot=_read_secure_boot(),
        debugger_denied=dumpable,
        core_dumps_off=resource.getrlimit(resource.RLIMIT_CORE) == (0, 0),
    )
