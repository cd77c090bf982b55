"""Run the emulator over HTTP on loopback with uvicorn, and write its manifest."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import uvicorn

from services.emulator.app import EmulatorApp, build_app
from services.emulator.faults import FaultPlan
from services.emulator.seed import SeedConfig, SeededMerchant, seed_square

__all__ = ["manifest", "serve", "write_manifest"]


def manifest(base_url: str, merchants: list[SeededMerchant]) -> dict[str, Any]:
    return {"base_url": base_url, "merchants": [m.manifest_entry() for m in merchants]}


def write_manifest(path: Path, document: dict[str, Any]) -> None:
    """Write atomically and owner-only: the manifest holds (emulator) access tokens."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-")
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_demo_files(directory: Path, merchants: list[SeededMerchant]) -> None:
    """A credentials file (owner-only) and consent records for the seeded merchants, so a new
    user can try the command line against `emulator serve` in three commands."""
    from datetime import UTC, datetime

    from services.demo import consent_for

    directory.mkdir(parents=True, exist_ok=True)
    credentials = directory / "credentials.toml"
    lines = []
    for index, merchant in enumerate(merchants):
        lines.append(f"[merchants.{merchant.merchant.id}]\n"
                     f"access_token = \"{merchant.token.token}\"\n"
                     f"sync_time = \"{3 + index % 4:02d}:00\"\n")
    fd = os.open(credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines))
    os.chmod(credentials, 0o600)
    now = datetime.now(UTC)
    # Every merchant but the last two consents; those two stay on the reminder list.
    documents = [consent_for(m, now) for m in merchants[:max(1, len(merchants) - 2)]]
    (directory / "consents.json").write_text(json.dumps(documents, indent=2))


def serve(host: str, port: int, config: SeedConfig, faults: FaultPlan,
          manifest_path: Path | None = None, log_level: str = "warning",
          demo_files: Path | None = None, *, steering: bool = False,
          strict: bool = False) -> None:
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("the emulator only serves on loopback (127.0.0.1, localhost or ::1)")
    square, merchants = seed_square(config)
    emulator: EmulatorApp = build_app(square, faults, strict=strict, steering=steering)
    if demo_files is not None:
        write_demo_files(demo_files, merchants)
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on such sockets, and without it
    # Nagle plus delayed ACKs cost every answer ~40 ms.
    sock = socket.socket(socket.AF_INET6 if host == "::1" else socket.AF_INET,
                         socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    actual_port = sock.getsockname()[1]
    base_url = f"http://{'[::1]' if host == '::1' else host}:{actual_port}"
    emulator.base_url = base_url
    server = uvicorn.Server(uvicorn.Config(emulator.asgi(), log_level=log_level,
                                           access_log=False, timeout_graceful_shutdown=1))
    if manifest_path is not None:
        original_startup = server.startup

        async def startup(sockets: list[socket.socket] | None = None) -> None:
            await original_startup(sockets)
            write_manifest(manifest_path, manifest(base_url, merchants))

        server.startup = startup  # type: ignore[method-assign]
    server.run(sockets=[sock])
