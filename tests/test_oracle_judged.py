"""Discovery and completion judged by the independent oracle (tests/oracle), from the emulator's
raw order JSON and the raw consent documents, never by the product's own `classify`.

- Every order the queue shows as eligible is eligible by the oracle, and the other way round.
- Every order a batch completed was eligible by the oracle just before the batch, and every
  order the product records as completed is COMPLETED in Square.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.demo import consent_for, workspace_on_emulator
from services.emulator import FaultPlan
from services.square_gateway import RetryPolicy
from services.workspace import Workspace
from tests.conftest import Emulator, make_emulator
from tests.oracle import eligibility as oracle

FAST_RETRY = RetryPolicy(attempts=8, base_delay_s=0.01, max_delay_s=1.0)
ENGINE = {"max_attempts": 6, "attempt_timeout_s": 0.5, "base_backoff_s": 0.01,
          "max_rate_limit_waits": 40}


def consent_documents(emulator: Emulator) -> dict[str, list[dict[str, Any]]]:
    """Consents in several states and scopes, so the oracle's consent rules all matter."""
    now = datetime.now(UTC)
    first, second, third = emulator.merchants[:3]
    narrow = consent_for(third, now, locations=[third.locations[0].id], limits={
        "max_amount_per_batch": {"amount": 6000 * (1 if third.merchant.currency == "JPY"
                                                   else 100) // 10,
                                 "currency": third.merchant.currency}})
    return {first.merchant.id: [consent_for(first, now)],
            second.merchant.id: [consent_for(second, now, state="revoked")],
            third.merchant.id: [narrow]}


def open_workspace(emulator: Emulator, tmp_path: Path,
                   documents: dict[str, list[dict[str, Any]]]) -> Workspace:
    workspace = workspace_on_emulator(emulator.app, emulator.merchants, tmp_path / "recon.db",
                                      "tester", timeout_s=2.0, retry=FAST_RETRY)
    workspace.engine_options = dict(ENGINE)
    path = tmp_path / "consents.json"
    path.write_text(json.dumps([d for docs in documents.values() for d in docs]))
    workspace.import_consent_files([path])
    return workspace


def raw_orders(emulator: Emulator) -> dict[str, dict[str, Any]]:
    return {order_id: record.copy_doc() for order_id, record in emulator.square.orders.items()}


def oracle_verdicts(emulator: Emulator, documents: dict[str, list[dict[str, Any]]],
                    orders: dict[str, dict[str, Any]], now: datetime
                    ) -> dict[str, oracle.Verdict]:
    returned = oracle.returned_order_ids(orders.values())
    merchant_of = {order_id: record.merchant_id
                   for order_id, record in emulator.square.orders.items()}
    return {order_id: oracle.judge(doc, documents.get(merchant_of[order_id], []), now, returned)
            for order_id, doc in orders.items()}


async def test_the_queue_agrees_with_the_oracle(emulator: Emulator, tmp_path: Path) -> None:
    documents = consent_documents(emulator)
    workspace = open_workspace(emulator, tmp_path, documents)
    try:
        reports = await workspace.refresh()
        assert all(r.error is None for r in reports)
        verdicts = oracle_verdicts(emulator, documents, raw_orders(emulator), workspace.clock())
        queued = workspace.queue()
        assert queued
        shown_eligible = {o.order_id for o in queued if o.eligible}
        for order in queued:
            verdict = verdicts[order.order_id]
            assert order.eligible == verdict.eligible, (order.order_id, order.reason,
                                                        sorted(verdict.reasons))
            if not order.eligible:
                assert order.reason in verdict.reasons, (order.reason, verdict.reasons)
        # Nothing the oracle finds eligible in a searched location is missing from the queue.
        searched = {loc.id for m in emulator.merchants for loc in m.locations
                    if loc.status == "ACTIVE"}
        should = {i for i, v in verdicts.items() if v.eligible
                  and emulator.square.orders[i].location_id in searched}
        assert should == shown_eligible
        assert shown_eligible, "no eligible order: the comparison would be empty"
        # The seed holds refunded orders the oracle refuses: the check has something to catch.
        assert any("REFUNDED" in v.reasons and v.reasons <= {"REFUNDED", "NOT_OPEN"}
                   for v in verdicts.values())
    finally:
        await workspace.aclose()


@pytest.mark.parametrize(("plan", "strict"), [
    (None, False), (FaultPlan(lost_response_rate=0.3, operations=["UpdateOrder"], seed=13), False),
    (FaultPlan(lost_response_rate=0.3, version_bump_rate=0.2, operations=["UpdateOrder"],
               seed=13), True),
], ids=["clean", "lost-responses", "lost-responses-strict"])
async def test_every_completion_was_eligible_by_the_oracle(tmp_path: Path,
                                                           plan: FaultPlan | None,
                                                           strict: bool) -> None:
    emulator = make_emulator(strict=strict)
    documents = consent_documents(emulator)
    workspace = open_workspace(emulator, tmp_path, documents)
    try:
        await workspace.refresh()
        preview = workspace.preview()
        before = raw_orders(emulator)
        verdicts = oracle_verdicts(emulator, documents, before, workspace.clock())
        if plan is not None:
            emulator.app.set_faults(plan)
        _, results = await workspace.complete(preview)
        emulator.app.set_faults(FaultPlan())
        await workspace.recover()
        newly = {i for i, r in emulator.square.orders.items()
                 if r.state == "COMPLETED" and before.get(i, {}).get("state") != "COMPLETED"}
        assert newly, "nothing was completed: the judgement would be empty"
        for order_id in newly:
            assert verdicts[order_id].eligible, (order_id, sorted(verdicts[order_id].reasons))
        recorded = {row["order_id"] for row in workspace.store.db["intents"].rows
                    if row["outcome"] == "completed"}
        assert recorded <= newly, "the product recorded a completion Square did not make"
        assert {r.order_id for r in results if r.outcome.value == "completed"} <= newly
    finally:
        await workspace.aclose()
