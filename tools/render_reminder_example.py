"""Render one example reminder (text and HTML) for the README:
`python -m tools.render_reminder_example docs/`. The HTML is what the merchant's mail client
shows; docs/reminder-example.png is a headless-Chromium screenshot of it
(`chromium --headless --screenshot=... docs/reminder-example.html`)."""

from __future__ import annotations

import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from services.audit import AuditTrail
from services.reminders import ReminderService
from services.store import Store
from tests.reminders_support import add_merchant, add_orders

NOW = datetime(2026, 11, 26, 15, 0, tzinfo=UTC)


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        store = Store(Path(scratch) / "recon.db")
        (location,) = add_merchant(store, "MLB4Y7X2K9", name="Blue Fern Bakery",
                                   timezone="Europe/London",
                                   email="hello@bluefernbakery.example")
        add_orders(store, "MLB4Y7X2K9", location, NOW, [9.2, 5.1, 3.4, 2.3], amount=4250)
        service = ReminderService(store, AuditTrail(store, lambda: NOW),
                                  sender="Ledgerline Reconciliation Team "
                                         "<recon@ledgerline.example>",
                                  consent_link="https://ledgerline.example/"
                                               "managed-reconciliation",
                                  consents=dict, clock=lambda: NOW, operator="docs")
        plan = next(p for p in service.plan() if p.due)
        rendered = service.render(plan)
        out.mkdir(parents=True, exist_ok=True)
        (out / "reminder-example.html").write_text(rendered.html)
        (out / "reminder-example.txt").write_text(rendered.text)
        store.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs"))
