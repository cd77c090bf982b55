"""The completion engine under both readings of what square-api.md leaves UNCONFIRMED (§2 rule 2,
§14): the lenient one (a PROPOSED fulfillment may jump to COMPLETED in the completing call, a
key-less update applies) and the strict one (`strict=True`: the jump is refused, a key-less or
reused-key update is a 200 that changed nothing, 429 without Retry-After). Under either, the product
never records a completion Square did not make, and every completion was eligible by the oracle."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.completion import Outcome
from services.emulator import FaultPlan, SeedConfig
from tests.conftest import make_emulator
from tests.oracle import eligibility as oracle
from tests.test_oracle_judged import consent_documents, open_workspace, raw_orders


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
async def test_proposed_fulfillments_under_both_readings(tmp_path: Path, strict: bool) -> None:
    emulator = make_emulator(SeedConfig(merchants=3, orders_per_location=25), strict=strict)
    documents = consent_documents(emulator)
    workspace = open_workspace(emulator, tmp_path, documents)
    try:
        await workspace.refresh()
        preview = workspace.preview()
        before = raw_orders(emulator)
        now = workspace.clock()
        proposed = {i.order_id for i in preview.items
                    if any(f.get("state") == "PROPOSED"
                           for f in before[i.order_id].get("fulfillments") or [])}
        others = {i.order_id for i in preview.items} - proposed
        assert proposed and others, "the batch must hold both kinds of order"
        emulator.app.set_faults(FaultPlan(rate_limit_rps=40, seed=3))
        _, results = await workspace.complete(preview)
        emulator.app.set_faults(FaultPlan())
        await workspace.recover()
        in_square = {i for i, r in emulator.square.orders.items() if r.state == "COMPLETED"
                     and before[i]["state"] != "COMPLETED"}
        recorded = {row["order_id"] for row in workspace.store.db["intents"].rows
                    if row["outcome"] == "completed"}
        reported = {r.order_id for r in results if r.outcome is Outcome.COMPLETED}
        assert recorded <= in_square and reported <= in_square, \
            "the product recorded a completion Square did not make"
        returned = oracle.returned_order_ids(before.values())
        merchant_of = {i: r.merchant_id for i, r in emulator.square.orders.items()}
        for order_id in in_square:
            assert oracle.judge(before[order_id], documents[merchant_of[order_id]], now,
                                returned).eligible
        assert others <= in_square
        if strict:
            assert not proposed & in_square
            assert all(emulator.square.orders[i].state == "OPEN" for i in proposed)
            failed = {r.order_id for r in results if r.outcome is Outcome.FAILED}
            assert proposed <= failed
        else:
            assert proposed <= in_square
    finally:
        await workspace.aclose()
