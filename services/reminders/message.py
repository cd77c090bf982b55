"""The reminder e-mail: Jinja2 templates (text and HTML alternatives, one pair and a subject per
kind), built with the standard `email` package.

Templates ship in `templates/` and a file of the same name in the configured directory
(`RECON_REMINDER_TEMPLATES`) overrides one. HTML templates are autoescaped. Text from Square
(business names, references) reaches headers only through `header_text`, which folds every
control character and line break into a space, so a CR/LF in a name can never add a header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, getaddresses
from pathlib import Path
from zoneinfo import ZoneInfo

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, PackageLoader, StrictUndefined

from services.eligibility import dashboard_url
from services.reminders.planning import ReminderKind, ReminderPlan

__all__ = ["MessageBuilder", "RenderedReminder", "header_text", "plain_text", "sender_domain"]

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_ZERO_DECIMAL = {"JPY", "KRW", "VND", "CLP", "ISK", "UGX", "XAF", "XOF"}


def plain_text(value: str | None, limit: int = 200) -> str:
    """Outside text for a body: control characters (terminal escapes, CR/LF) become spaces."""
    text = _CONTROLS.sub(" ", value or "").strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def header_text(value: str | None, limit: int = 120) -> str:
    """Outside text for a header: one line, whitespace collapsed."""
    return " ".join(plain_text(value, limit * 2).split())[:limit]


def money(amount: int, currency: str) -> str:
    if currency in _ZERO_DECIMAL:
        return f"{amount:,} {currency}"
    return f"{amount / 100:,.2f} {currency}"


def _age(delta: timedelta) -> str:
    days = int(delta / timedelta(days=1))
    if days >= 1:
        return f"{days} day{'s' if days != 1 else ''}"
    hours = int(delta / timedelta(hours=1))
    return f"{hours} hour{'s' if hours != 1 else ''}"


def sender_domain(sender: str) -> str:
    pairs = getaddresses([sender])
    address = pairs[0][1] if pairs else ""
    return address.rpartition("@")[2] or "localhost"


@dataclass(frozen=True)
class RenderedReminder:
    message: EmailMessage
    subject: str
    text: str
    html: str

    def as_bytes(self) -> bytes:
        return self.message.as_bytes(policy=SMTP)


class MessageBuilder:
    def __init__(self, sender: str, consent_link: str, override_dir: Path | None = None
                 ) -> None:
        pairs = getaddresses([sender])
        if not pairs or "@" not in pairs[0][1]:
            from services.errors import ConfigurationError
            raise ConfigurationError(f"RECON_REMINDER_FROM {sender!r} is not an address; "
                                     'use e.g. "Reconciliation Team <recon@example.com>".')
        name, address = pairs[0]
        user, _, domain = address.rpartition("@")
        self.sender = Address(display_name=header_text(name), username=user, domain=domain)
        self.sender_name = header_text(name) or address
        self.consent_link = consent_link
        loaders: list[FileSystemLoader | PackageLoader] = []
        if override_dir is not None and override_dir.is_dir():
            loaders.append(FileSystemLoader(str(override_dir)))
        loaders.append(PackageLoader("services.reminders", "templates"))
        loader = ChoiceLoader(loaders)
        common = dict(loader=loader, undefined=StrictUndefined, trim_blocks=True,
                      lstrip_blocks=True, keep_trailing_newline=True)
        self.html_env = Environment(autoescape=True, **common)  # type: ignore[arg-type]
        self.text_env = Environment(autoescape=False, **common)  # type: ignore[arg-type]

    def context(self, plan: ReminderPlan, now: datetime) -> dict[str, object]:
        zone = ZoneInfo(plan.timezone) if plan.timezone else ZoneInfo("UTC")
        listed = plan.orders[:20]
        return {
            "business_name": plan_name(plan),
            "kind": plan.kind.value,
            "count": len(plan.orders),
            "oldest_age": _age(plan.oldest_age),
            "totals": [money(a, c) for c, a in sorted(plan.totals.items())],
            "orders": [{"reference": plain_text(o.reference_id or o.order_id, 60),
                        "date": o.created_at.astimezone(zone).strftime("%d %b %Y"),
                        "amount": money(o.total_amount, o.currency),
                        "reason": _REASON_TEXT.get(o.reason, ""),
                        "link": dashboard_url(o.order_id)} for o in listed],
            "more": max(0, len(plan.orders) - len(listed)),
            "consent_link": self.consent_link,
            "sender_name": self.sender_name,
        }

    def render(self, plan: ReminderPlan, now: datetime, message_id: str | None = None
               ) -> RenderedReminder:
        context = self.context(plan, now)
        kind = plan.kind.value
        subject = header_text(self.text_env.get_template(f"{kind}.subject.j2").render(context))
        text = self.text_env.get_template(f"{kind}.txt.j2").render(context)
        html = self.html_env.get_template(f"{kind}.html.j2").render(context)
        message = EmailMessage(policy=SMTP)
        message["From"] = self.sender
        message["To"] = [Address(addr_spec=a) for a in plan.recipients]
        message["Subject"] = subject
        message["Date"] = format_datetime(now)
        message["Message-ID"] = message_id or plan.message_id
        # Mail systems hold back auto-replies and vacation notices for these.
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(text)
        message.add_alternative(html, subtype="html")
        return RenderedReminder(message, subject, text, html)


def plan_name(plan: ReminderPlan) -> str:
    return plain_text(plan.business_name, 120) or plan.merchant_id


_REASON_TEXT = {
    "MANUAL_ONLY": "can only be completed in the Dashboard",
    "PAYMENT_NOT_CAPTURED": "card payment authorized but not captured",
    "NOT_FULLY_PAID": "not fully paid",
    "REFUNDED": "refunded or returned",
}

_ = ReminderKind  # the template names follow its values
