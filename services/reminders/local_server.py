"""A local SMTP server on loopback (aiosmtpd, in its own thread): the demo's mailbox, and what
tests and the benchmark send to. A real SMTP conversation; nothing leaves the machine."""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any, cast

from aiosmtpd.controller import Controller

__all__ = ["LocalSmtpServer", "Mailbox", "ReceivedMail"]


@dataclass(frozen=True)
class ReceivedMail:
    sender: str
    recipients: tuple[str, ...]
    data: bytes

    @property
    def message_id(self) -> str:
        return str(message_from_bytes(self.data, policy=policy.SMTP)["Message-ID"]).strip()

    @property
    def subject(self) -> str:
        return str(message_from_bytes(self.data, policy=policy.SMTP)["Subject"])


class Mailbox:
    """aiosmtpd handler: keeps every message (and writes it as .eml into `directory`)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self.messages: list[ReceivedMail] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        mail = ReceivedMail(envelope.mail_from, tuple(envelope.rcpt_tos), bytes(envelope.content))
        with self.lock:
            self.messages.append(mail)
            number = len(self.messages)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / f"{number:05d}.eml").write_bytes(mail.data)
        return "250 2.0.0 OK: queued"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LocalSmtpServer:
    """`with LocalSmtpServer() as server: ... server.url ... server.mailbox.messages`."""

    def __init__(self, handler: Any = None, directory: Path | None = None,
                 auth: tuple[str, str] | None = None, tls: ssl.SSLContext | None = None,
                 implicit_tls: bool = False) -> None:
        self.handler = handler or Mailbox(directory)
        options: dict[str, Any] = {}
        if tls is not None and implicit_tls:
            options.update(ssl_context=tls)
        elif tls is not None:
            options.update(tls_context=tls, require_starttls=True)
        if auth is not None:
            user, password = auth

            def check(server: Any, session: Any, envelope: Any, mechanism: str,
                      data: Any) -> Any:
                from aiosmtpd.smtp import AuthResult
                ok = getattr(data, "login", b"") == user.encode() and \
                    getattr(data, "password", b"") == password.encode()
                return AuthResult(success=ok, handled=False)
            # Loopback only: tests of the login run without TLS, as the client allows there.
            options.update(authenticator=check, auth_require_tls=tls is not None)
        self._options = options
        self._listen_on(_free_port())

    def _listen_on(self, port: int) -> None:
        self.port = port
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=port,
                                     server_hostname="localhost", **self._options)

    @property
    def mailbox(self) -> Mailbox:
        return cast(Mailbox, self.handler)

    def url(self, user: str | None = None, scheme: str = "smtp") -> str:
        return f"{scheme}://{user + '@' if user else ''}127.0.0.1:{self.port}"

    def start(self) -> LocalSmtpServer:
        # aiosmtpd's server thread inherits the daemon flag of the thread that starts it:
        # started from a daemon thread, it never keeps the process alive on exit.
        failure: list[BaseException] = []

        def start() -> None:
            try:
                self.controller.start()
            except BaseException as error:
                failure.append(error)
        for _ in range(5):
            failure.clear()
            starter = threading.Thread(target=start, daemon=True)
            starter.start()
            starter.join()
            if not failure or not isinstance(failure[0], OSError):
                break
            # Someone took the free port between our probe and the bind: take another.
            self._listen_on(_free_port())
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        self.controller.stop()

    def __enter__(self) -> LocalSmtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
