"""`recon-console demo --team`: the demo on a throwaway PostgreSQL cluster, ready for a second
console as another operator.

The demo's data is built as `recon-console demo` builds it (services/demo.py: the same seeded
emulator, tokens in every health, consents in every state), then moved onto the cluster by the
same copy `db migrate` does. The emulator is served over loopback HTTP, so the second console
(another process, another operator) works the same Square as the first, and both share one
database: leases, presence and the audit chain are the team's. The cluster asks for a password
(scram-sha-256), which sits in the demo's owner-only credentials file, never on a command line.
Reminders go to the demo's local mail server, as in `recon-console demo` (services/demo.py
`start_demo_mail`), from either console; its mailbox folder is named in the settings.
Everything lives in one temporary directory and is deleted on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from services.database_url import provide_password
from services.db_migrate import migrate_to_postgres
from services.demo import build_demo, start_demo_mail, write_demo_files
from services.emulator import EmulatorApp
from services.postgres_cluster import LocalCluster, claim_directory, reap_stale, start_cluster
from services.reminders.local_server import LocalSmtpServer
from services.settings import ReconSettings
from services.storage.postgres import create_database

__all__ = ["DATABASE", "SECOND_OPERATOR", "TeamDemo", "team_demo"]

DATABASE = "recon"
PREFIX = "recon-team-demo-"
SECOND_OPERATOR = "second-operator"


class _LoopbackEmulator:
    """The demo's emulator served by uvicorn on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, emulator: EmulatorApp) -> None:
        # IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (no 40 ms Nagle stalls).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        emulator.base_url = self.base_url
        self.server = uvicorn.Server(uvicorn.Config(emulator.asgi(), log_level="error",
                                                    access_log=False,
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True, name="team-demo-emulator")

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the demo's emulator did not start on loopback")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        self.sock.close()


@dataclass
class TeamDemo:
    directory: Path
    cluster: LocalCluster
    url: str                 # no password in it
    base_url: str            # the emulator on loopback
    credentials: Path        # merchant tokens and [database] password, owner-only
    # Reminders go to the demo's mail server, as in `demo` (smtp_url, demo_mailbox, ...).
    mail: dict[str, Any] = field(default_factory=dict)

    def settings(self, operator: str) -> ReconSettings:
        provide_password(self.url, self.credentials)
        return ReconSettings(db=self.url, square_base_url=self.base_url,
                             credentials=self.credentials, operator=operator, **self.mail)

    def second_console_command(self, program: str = "recon-console",
                               operator: str = SECOND_OPERATOR) -> str:
        """The one line that opens another console on this demo, as another operator."""
        return " ".join([f"RECON_DB={shlex.quote(self.url)}",
                         f"RECON_SQUARE_BASE_URL={shlex.quote(self.base_url)}",
                         f"RECON_CREDENTIALS={shlex.quote(str(self.credentials))}",
                         *(f"RECON_{name.upper()}={shlex.quote(str(value))}"
                           for name, value in self.mail.items()),
                         f"RECON_OPERATOR={shlex.quote(operator)}", shlex.quote(program)])


@contextlib.contextmanager
def team_demo(seed: int = 7, operator: str = "demo-operator") -> Iterator[TeamDemo]:
    """Start the cluster and the emulator, load the demo, yield; then stop and delete it all."""
    reap_stale(PREFIX)  # what a killed demo left (its cluster goes in start_cluster)
    directory = Path(tempfile.mkdtemp(prefix=PREFIX))
    cluster: LocalCluster | None = None
    server: _LoopbackEmulator | None = None
    mail: LocalSmtpServer | None = None
    try:
        claim_directory(directory)
        cluster = start_cluster(for_tests=False)
        url = cluster.url(DATABASE)
        credentials = directory / "credentials.toml"
        env = build_demo(seed=seed, operator=operator, directory=directory / "build")
        try:
            write_demo_files(directory, env.merchants)
            with open(credentials, "a") as handle:  # already owner-only (write_demo_files)
                handle.write(f'\n[database]\npassword = "{cluster.password}"\n')
            provide_password(cluster.url(), credentials)
            create_database(cluster.url(), DATABASE)
            source = env.workspace.settings.db
        finally:
            asyncio.run(env.workspace.aclose())
        migrate_to_postgres(ReconSettings(db=source, credentials=credentials,
                                          checkpoint_dir=directory / "build-checkpoints",
                                          operator=operator), url)
        server = _LoopbackEmulator(env.emulator)
        server.start()
        mail, mail_settings = start_demo_mail(directory / "mailbox")
        yield TeamDemo(directory, cluster, url, server.base_url, credentials, mail_settings)
    finally:
        if mail is not None:
            mail.stop()
        if server is not None:
            server.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
