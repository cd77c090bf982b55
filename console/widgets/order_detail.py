"""The detail panel for the highlighted order: line items, tenders, fulfillments, and where to
complete it by hand when the API cannot."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from textual.widgets import Static

from console.safe_text import SafeText, safe, safe_join
from services.eligibility import dashboard_url
from services.store import QueuedOrder
from services.workspace import format_money


class OrderDetail(Static):
    """Everything here is Square's text (names, ids, types): SafeText cells only, since
    a str cell of a Rich Table is parsed as markup."""

    def show(self, order: QueuedOrder | None, document: dict[str, Any] | None,
             merchant_name: str = "") -> None:
        if order is None:
            self.update(safe("No order highlighted.", "dim"))
            return
        head = safe_join((merchant_name, "bold"))
        head.append("\n")
        head.append(f"Order {order.order_id}\n")
        head.append(f"Ref {order.reference_id or '—'}  v{order.version}  {order.state}\n")
        head.append(f"Created {order.created_at[:16].replace('T', ' ')} UTC\n")
        head.append(f"Total {format_money(order.total_amount, order.currency)}  "
                    f"due {format_money(order.due_amount, order.currency)}\n")
        if order.eligible:
            head.append("✔ Completion candidate\n", style="bold green")
        else:
            head.append(f"✘ {order.reason}: {order.detail}\n", style="bold yellow")
        parts: list[Any] = [head]
        document = document or {}
        items = Table("Item", "Qty", "Total", box=None, padding=(0, 1), title="Line items",
                      title_justify="left")
        for item in document.get("line_items", []):
            total = item.get("total_money") or {}
            items.add_row(safe(item.get("name") or "—"), safe(item.get("quantity", "1")),
                          safe(format_money(total.get("amount", 0), total.get("currency", ""))))
        parts.append(items)
        tenders = Table("Tender", "Status", "Amount", box=None, padding=(0, 1),
                        title="Tenders", title_justify="left")
        for tender in document.get("tenders", []):
            money = tender.get("amount_money") or {}
            status = (tender.get("card_details") or {}).get("status", "—")
            tenders.add_row(safe(tender.get("type", "?")), safe(status),
                            safe(format_money(money.get("amount", 0), money.get("currency", ""))))
        parts.append(tenders)
        fulfillments = Table("Fulfillment", "State", box=None, padding=(0, 1),
                             title="Fulfillments", title_justify="left")
        for fulfillment in document.get("fulfillments", []):
            fulfillments.add_row(safe(fulfillment.get("type", "?")),
                                 safe(fulfillment.get("state", "?")))
        parts.append(fulfillments)
        link = SafeText("\nSquare Dashboard: ", "dim")
        link.append(dashboard_url(order.order_id), style="underline")
        parts.append(link)
        self.update(Group(*parts))
