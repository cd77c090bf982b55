"""SMTP over TLS against aiosmtpd on loopback with a certificate made by the test: STARTTLS
with a login (the host treated as remote, so TLS is what allows the password), implicit TLS,
and a certificate the client does not trust."""

from __future__ import annotations

import dataclasses
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import SecretStr

from services.audit import AuditTrail
from services.reminders import ReminderService, SmtpTarget, SmtpUnavailable
from services.reminders.local_server import LocalSmtpServer
from services.store import Store
from tests.reminders_support import add_merchant, add_orders

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for the TLS tests")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(certificate[1]), str(certificate[0]))
    return context


@pytest.fixture
def service() -> Iterator[ReminderService]:
    store = Store(":memory:")
    (loc,) = add_merchant(store, "M1", timezone="UTC")
    add_orders(store, "M1", loc, NOW, [5])
    yield ReminderService(store, AuditTrail(store, lambda: NOW), sender="R <r@x.example>",
                          consent_link="https://x.example", consents=dict,
                          clock=lambda: NOW, operator="tls-test")
    store.close()


def test_starttls_then_login_when_the_host_is_remote(
        certificate: tuple[Path, Path], service: ReminderService,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from services.reminders import smtp as smtp_module
    monkeypatch.setattr(smtp_module, "is_loopback", lambda host: False)
    with LocalSmtpServer(auth=("recon", "pw-1"), tls=server_context(certificate)) as server:
        target = SmtpTarget.parse(server.url("recon"), SecretStr("pw-1"))
        service.smtp = dataclasses.replace(
            target, tls_context=ssl.create_default_context(cafile=str(certificate[1])))
        (result,) = service.send(service.plan())
        assert result.status == "sent" and len(server.mailbox.messages) == 1


def test_implicit_tls(certificate: tuple[Path, Path], service: ReminderService) -> None:
    with LocalSmtpServer(tls=server_context(certificate), implicit_tls=True) as server:
        target = SmtpTarget.parse(server.url(scheme="smtps"))
        service.smtp = dataclasses.replace(
            target, tls_context=ssl.create_default_context(cafile=str(certificate[1])))
        (result,) = service.send(service.plan())
        assert result.status == "sent" and len(server.mailbox.messages) == 1


def test_untrusted_certificate_is_a_clear_error(certificate: tuple[Path, Path],
                                                service: ReminderService) -> None:
    with LocalSmtpServer(tls=server_context(certificate), implicit_tls=True) as server:
        service.smtp = SmtpTarget.parse(server.url(scheme="smtps"))   # system trust store
        with pytest.raises(SmtpUnavailable, match=r"TLS with SMTP server smtps://127\.0\.0\.1"):
            service.send(service.plan())
        assert server.mailbox.messages == [] and service.history() == []
