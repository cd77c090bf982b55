"""Who holds a piece of work: this host's name, and whether a process of this host still lives.
Used by merchant leases and by the reminder outbox to tell a dead holder from a live one."""

from __future__ import annotations

import os
import socket

__all__ = ["HOST", "pid_alive"]

HOST = socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (signal 0 checks without touching it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
