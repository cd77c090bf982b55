"""Files that hold orders, consents or the audit are readable by their owner only (0600)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TextIO

__all__ = ["PRIVATE_MODE", "create_private", "open_private"]

PRIVATE_MODE = 0o600


def create_private(path: Path) -> None:
    """Create an empty file, 0600, unless it exists. SQLite then opens it as a new database
    and gives its -wal and -shm files the same mode."""
    with contextlib.suppress(FileExistsError):  # another process made it first: fine
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))


def open_private(path: Path, newline: str | None = None) -> TextIO:
    """Open for writing text, created or truncated, 0600 whatever the umask or its old mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, PRIVATE_MODE)  # an existing file would otherwise keep its mode
        return os.fdopen(fd, "w", newline=newline, encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise
