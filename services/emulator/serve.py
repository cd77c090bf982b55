"""Run the emulator over HTTP on loopback with uvicorn, and write its manifest."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Callable
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


def serve(host: str, port: int, config: SeedConfig, faults: FaultPlan,
          manifest_path: Path | None = None, log_level: str = "warning",
          on_seeded: Callable[[list[SeededMerchant]], None] | None = None, *,
          steering: bool = False, strict: bool = False) -> None:
    """Seed, then serve until interrupted. `on_seeded` sees the seeded merchants before the
    server starts (the product's demo writes its files from them: the emulator knows nothing
    of the product)."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("the emulator only serves on loopback (127.0.0.1, localhost or ::1)")
    square, merchants = seed_square(config)
    emulator: EmulatorApp = build_app(square, faults, strict=strict, steering=steering)
    if on_seeded is not None:
        on_seeded(merchants)
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
