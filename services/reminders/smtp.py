"""Sending over SMTP (smtplib): one connection per batch, answers mapped to outcomes.

    2xx                          sent
    4xx                          deferred (retried with backoff, within the window)
    5xx                          failed, with the server's reason
    dropped connection           reconnect once and re-send (same Message-ID), else deferred
    refused / TLS / login fails  SmtpUnavailable naming the server (nothing is sent)

`smtp://` uses STARTTLS and `smtps://` implicit TLS. A password is never sent, and no message
leaves, over a connection without TLS, except to a loopback address.
"""

from __future__ import annotations

import ipaddress
import smtplib
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import SecretStr

from services.errors import ConfigurationError, ReconError

__all__ = ["SmtpAnswer", "SmtpSession", "SmtpTarget", "SmtpUnavailable", "is_loopback"]


class SmtpUnavailable(ReconError):
    """The SMTP server could not be reached, or refused TLS or the login."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SmtpTarget:
    scheme: str
    host: str
    port: int
    user: str | None = None
    password: SecretStr | None = None
    timeout_s: float = 30.0
    tls_context: ssl.SSLContext | None = None

    @classmethod
    def parse(cls, url: str, password: SecretStr | None = None) -> SmtpTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ConfigurationError(f"RECON_SMTP_URL {url!r} is not an SMTP URL; use "
                                     "smtp://user@host:587 (STARTTLS) or smtps://user@host:465.")
        if parts.password is not None:
            raise ConfigurationError("RECON_SMTP_URL must not hold a password: put it in the "
                                     "credentials file as [smtp] password = \"...\".")
        try:
            port = parts.port or (465 if parts.scheme == "smtps" else 587)
        except ValueError:
            raise ConfigurationError(f"RECON_SMTP_URL {url!r} has an invalid port.") from None
        user = unquote(parts.username) if parts.username else None
        if user and password is None:
            raise ConfigurationError(f"RECON_SMTP_URL names user {user!r} but the credentials "
                                     "file has no [smtp] password = \"...\".")
        return cls(parts.scheme, parts.hostname, port, user, password if user else None)

    @property
    def label(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True)
class SmtpAnswer:
    status: str              # sent | deferred | failed
    code: int | None
    reason: str              # the server's words, one line

    @property
    def reason_code(self) -> str | None:
        if self.status == "sent":
            return None
        return f"SMTP_{self.code}" if self.code else "SMTP_DISCONNECTED"


def _words(message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    return " ".join(text.split())[:300]


def _answer(code: int, message: bytes | str) -> SmtpAnswer:
    if 200 <= code < 300:
        return SmtpAnswer("sent", code, _words(message))
    return SmtpAnswer("deferred" if 400 <= code < 500 else "failed", code, _words(message))


class SmtpSession:
    """`with SmtpSession(target) as smtp: smtp.send(sender, recipients, data)`."""

    def __init__(self, target: SmtpTarget) -> None:
        self.target = target
        self._smtp: smtplib.SMTP | None = None
        self.connections = 0

    def __enter__(self) -> SmtpSession:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        target = self.target
        context = target.tls_context or ssl.create_default_context()
        smtp: smtplib.SMTP | None = None
        try:
            if target.scheme == "smtps":
                smtp = smtplib.SMTP_SSL(target.host, target.port, timeout=target.timeout_s,
                                        context=context)
                secure = True
            else:
                smtp = smtplib.SMTP(target.host, target.port, timeout=target.timeout_s)
                smtp.ehlo()
                secure = smtp.has_extn("starttls")
                if secure:
                    smtp.starttls(context=context)
                    smtp.ehlo()
            if not secure and not is_loopback(target.host):
                raise SmtpUnavailable(f"SMTP server {target.label} does not offer STARTTLS; "
                                      "refusing to send without TLS. Use smtps:// or a server "
                                      "with STARTTLS.")
            if target.user is not None:
                if not secure and not is_loopback(target.host):  # checked above; kept local
                    raise SmtpUnavailable(f"refusing to send the password to {target.label} "
                                          "without TLS.")
                assert target.password is not None
                smtp.login(target.user, target.password.get_secret_value())
        except SmtpUnavailable:
            _quietly_close(smtp)
            raise
        except smtplib.SMTPAuthenticationError as error:
            _quietly_close(smtp)
            raise SmtpUnavailable(f"SMTP server {target.label} refused the login of "
                                  f"{target.user!r} ({error.smtp_code} "
                                  f"{_words(error.smtp_error)}); check [smtp] password in "
                                  "the credentials file.") from None
        except ssl.SSLError as error:
            _quietly_close(smtp)
            raise SmtpUnavailable(f"TLS with SMTP server {target.label} failed "
                                  f"({error.reason or error}); check the URL's scheme "
                                  "(smtps:// for implicit TLS, smtp:// for STARTTLS) and the "
                                  "server's certificate.") from None
        except (OSError, smtplib.SMTPException) as error:
            _quietly_close(smtp)
            why = getattr(error, "strerror", None) or _words(str(error)) or type(error).__name__
            raise SmtpUnavailable(f"cannot reach SMTP server {target.label} ({why}); check "
                                  "RECON_SMTP_URL and that the server is running.") from None
        self._smtp = smtp
        self.connections += 1

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                _quietly_close(smtp)

    def send(self, sender: str, recipients: list[str], data: bytes) -> SmtpAnswer:
        """One SMTP transaction. A dropped connection is retried once on a new one."""
        for attempt in (1, 2):
            if self._smtp is None:
                try:
                    self.connect()
                except SmtpUnavailable as error:
                    return SmtpAnswer("deferred", None, str(error))
            assert self._smtp is not None
            try:
                refused = self._smtp.sendmail(sender, recipients, data)
            except smtplib.SMTPRecipientsRefused as error:
                code, message = next(iter(error.recipients.values()))
                self._reset()
                return _answer(code, message)
            except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as error:
                self._reset()
                return _answer(error.smtp_code, error.smtp_error)
            except smtplib.SMTPResponseException as error:
                if error.smtp_code == 421:  # the server is closing the connection
                    self._drop()
                return _answer(error.smtp_code, error.smtp_error)
            except (smtplib.SMTPServerDisconnected, OSError) as error:
                self._drop()
                if attempt == 2:
                    return SmtpAnswer("deferred", None, f"connection to {self.target.label} "
                                      f"dropped ({_words(str(error)) or 'no answer'})")
                continue
            if refused:
                listed = "; ".join(f"{r}: {c} {_words(m)}" for r, (c, m) in refused.items())
                return SmtpAnswer("sent", 250, f"accepted, except {listed}")
            return SmtpAnswer("sent", 250, "accepted")
        raise AssertionError("unreachable")

    def _reset(self) -> None:
        try:
            if self._smtp is not None:
                self._smtp.rset()
        except (OSError, smtplib.SMTPException):
            self._drop()

    def _drop(self) -> None:
        _quietly_close(self._smtp)
        self._smtp = None


def _quietly_close(smtp: smtplib.SMTP | None) -> None:
    if smtp is not None:
        try:
            smtp.close()
        except OSError:
            pass


def smtp_target_from(settings: Any, required: bool) -> SmtpTarget | None:
    """The target from `RECON_SMTP_URL`, with the password from the credentials file's
    `[smtp]` section when the URL names a user. None when unset and not required."""
    from services.credentials import load_section_secret
    if not settings.smtp_url:
        if required:
            raise ConfigurationError("RECON_SMTP_URL is not set: set it to "
                                     "smtp://user@host:587 (STARTTLS) or smtps://user@host:465.")
        return None
    password = None
    if urlsplit(settings.smtp_url).username:
        password = load_section_secret(settings.credentials, "smtp", "password")
    return SmtpTarget.parse(settings.smtp_url, password)
