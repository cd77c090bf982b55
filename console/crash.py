"""When the console dies on an unexpected exception: the traceback goes to a private log file in
the state directory, with every known secret replaced, and the operator reads one line."""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import platformdirs

from services.settings import APP_NAME
from services.text_safety import printable

__all__ = ["crash_directory", "scrub", "write_crash_log"]

REDACTED = "[REDACTED]"


def crash_directory() -> Path:
    return Path(platformdirs.user_state_dir(APP_NAME))


def scrub(text: str, secrets: Iterable[str]) -> str:
    # Longest first, so a secret that contains another is replaced whole.
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def write_crash_log(error: BaseException, secrets: Iterable[str],
                    directory: Path | None = None) -> Path:
    """Write the traceback (frames and the message, never the frames' locals) to
    `crash-<time>-<pid>.log`, readable by its owner only; return its path."""
    directory = directory or crash_directory()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = directory / f"crash-{stamp}-{os.getpid()}.log"
    text = scrub("".join(traceback.format_exception(error)), list(secrets))
    # O_EXCL with 0600: the file is private from its first byte, never a pre-existing one.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as handle:
        handle.write(text)
    return path


def crash_line(error: BaseException, secrets: Iterable[str], log: Path | None) -> str:
    """What the operator reads on stderr: what happened and where the details are."""
    message = scrub(printable(str(error)), list(secrets))[:200]
    where = f"traceback in {log}" if log else "the crash log could not be written"
    return (f"recon-console stopped on an unexpected {type(error).__name__}"
            f"{': ' + message if message else ''} ({where}).")
