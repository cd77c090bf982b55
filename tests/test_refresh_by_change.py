"""Issue 11: a refresh asks Square only for what changed since the last one, and gives the same
queue as reading everything again.

The property test drives a small in-process emulator through random histories (completions,
cancellations, edits, payments, new orders, Square's background bumps, locations closing and
reopening, consents revoked or running out, time passing, the two clocks disagreeing by less
than the margin) and compares, after every refresh, the queue kept up by change with the queue
a full re-discovery builds in a database of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.demo import consent_for, workspace_on_emulator
from services.discovery import FULL_EVERY, MARK_MARGIN
from services.emulator import SeedConfig, build_app, seed_square
from services.emulator.seed import ORDER_KINDS, make_order
from services.emulator.state import TERMINAL_FULFILLMENT_STATES, SquareError
from services.errors import ConfigurationError
from services.square_gateway import RetryPolicy
from services.store import utc_text
from services.workspace import Workspace

BASE = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
NO_RETRY = RetryPolicy(attempts=1)


class World:
    """An emulated Square on a hand-moved clock, and two workspaces on it: one refreshed by
    change, one re-discovered in full."""

    def __init__(self, directory: Path, skew_s: int = 0, orders_per_location: int = 5,
                 seed: int = 7) -> None:
        self.now = BASE
        config = SeedConfig(seed=seed, merchants=2, locations_per_merchant=2,
                            orders_per_location=orders_per_location, inactive_location_every=0)
        square, self.merchants = seed_square(config, now=BASE - timedelta(minutes=10))
        skew = timedelta(seconds=skew_s)
        square.clock = lambda: self.now + skew
        self.square = square
        self.app = build_app(square)
        self.rng = random.Random(seed)
        consents = directory / "consents.json"
        documents = [consent_for(self.merchants[0], BASE)]
        # The second merchant's consent runs out a few hours into the history.
        second = consent_for(self.merchants[1], BASE)
        second["expires_at"] = (BASE + timedelta(hours=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
        documents.append(second)
        consents.write_text(json.dumps(documents))
        self.consent_ids = [d["consent_id"] for d in documents]
        self.by_change = self._workspace(directory / "by-change.db", consents)
        self.full = self._workspace(directory / "full.db", consents)

    def _workspace(self, db: Path, consents: Path) -> Workspace:
        workspace = workspace_on_emulator(self.app, self.merchants, db, "tester",
                                          retry=NO_RETRY)
        workspace.clock = lambda: self.now
        workspace.import_consent_files([consents])
        return workspace

    # ------------------------------------------------------------------ what Square does
    def open_orders(self) -> list[Any]:
        return [r for r in self.square.orders.values() if r.state == "OPEN"
                and r.version is not None]

    def update(self, record: Any, state: str) -> None:
        doc = record.doc
        f_state = "COMPLETED" if state == "COMPLETED" else "CANCELED"
        try:
            self.square.update_order(record.merchant_id, record.id, {"order": {
                "location_id": record.location_id, "version": record.version, "state": state,
                "fulfillments": [{"uid": f["uid"], "state": f_state}
                                 for f in doc.get("fulfillments") or []
                                 if f.get("state") not in TERMINAL_FULFILLMENT_STATES]}})
        except SquareError:
            pass  # not fully paid, say: Square refuses and nothing changes

    def apply(self, step: tuple[str, int]) -> None:
        action, pick = step
        candidates = self.open_orders()
        record = candidates[pick % len(candidates)] if candidates else None
        if action == "complete" and record is not None:
            self.update(record, "COMPLETED")
        elif action == "cancel" and record is not None:
            self.update(record, "CANCELED")
        elif action == "edit" and record is not None:
            self.square.update_order(record.merchant_id, record.id, {"order": {
                "location_id": record.location_id, "version": record.version,
                "reference_id": f"edited-{pick}"}})
        elif action == "bump" and record is not None:
            self.square.touch(record)  # Square's own background version bump
        elif action == "pay" and record is not None:
            due = record.doc["net_amount_due_money"]["amount"]
            if due > 0:
                try:
                    self.square.create_payment(record.merchant_id, {
                        "source_id": "cnon:card-nonce-ok", "order_id": record.id,
                        "amount_money": {"amount": due,
                                         "currency": record.doc["total_money"]["currency"]},
                        "idempotency_key": f"pay-{record.id}-{record.version}"})
                except SquareError:
                    pass  # a card authorization already covers it: Square refuses
        elif action == "new":
            merchant = self.merchants[pick % 2]
            location = merchant.locations[pick // 2 % len(merchant.locations)]
            kinds = sorted(ORDER_KINDS)
            make_order(self.square, self.rng, merchant.merchant.id, location,
                       kinds[pick % len(kinds)], self.now)
        elif action == "toggle_location":
            merchant = self.merchants[pick % 2]
            location = self.square.locations[merchant.locations[pick // 2 % 2].id]
            location.status = "INACTIVE" if location.status == "ACTIVE" else "ACTIVE"
            self.square.changed(merchant.merchant.id)
        elif action == "revoke":
            consent_id = self.consent_ids[pick % 2]
            for workspace in (self.by_change, self.full):
                try:
                    workspace.revoke_consent(consent_id, "owner", "test")
                except ConfigurationError:  # already revoked
                    pass
        elif action == "wait":
            self.now += timedelta(minutes=pick % 240)

    # ------------------------------------------------------------------ what we compare
    async def refresh_both(self) -> tuple[list[Any], list[Any]]:
        """The same moment seen both ways; `full=True` re-reads and re-classifies every order
        and replaces every row, as a first discovery does."""
        await self.by_change.refresh()
        await self.full.refresh(full=True)
        return snapshot(self.by_change), snapshot(self.full)

    async def aclose(self) -> None:
        await self.by_change.aclose()
        await self.full.aclose()


def snapshot(workspace: Workspace) -> list[Any]:
    """Every order as the queue and the detail panel see it, except when it was read."""
    return [(msgspec.structs.replace(o, fetched_at=None), workspace.store.order_json(o.order_id))
            for o in workspace.queue()]


ACTIONS = ["complete", "cancel", "edit", "bump", "pay", "new", "toggle_location", "revoke",
           "wait", "wait"]
steps = st.lists(st.tuples(st.sampled_from([*ACTIONS, "refresh"]), st.integers(0, 10_000)),
                 min_size=1, max_size=12)


@settings(max_examples=int(os.environ.get("REFRESH_EXAMPLES", "200")), deadline=None,
          derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(history=steps, skew_s=st.integers(-int(MARK_MARGIN.total_seconds()) + 1,
                                         int(MARK_MARGIN.total_seconds()) - 1))
def test_refresh_by_change_equals_full_rediscovery(history: list[tuple[str, int]],
                                                   skew_s: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        world = World(Path(directory), skew_s=skew_s, orders_per_location=3)

        async def run() -> None:
            try:
                await world.by_change.refresh()
                for step in [*history, ("refresh", 0)]:
                    if step[0] == "refresh":
                        by_change, full = await world.refresh_both()
                        assert by_change == full
                    else:
                        world.apply(step)
                    world.now += timedelta(seconds=1)
            finally:
                await world.aclose()
        asyncio.run(run())


# ---------------------------------------------------------------------- the mechanism itself
def searches(world: World) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    original = world.square.search_orders

    def spy(merchant_id: str, body: dict[str, Any]) -> Any:
        seen.append(body)
        return original(merchant_id, body)

    world.square.search_orders = spy
    return seen


def by_change_queries(seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for b in seen if "date_time_filter" in b["query"].get("filter", {})]


async def test_second_refresh_reads_only_changes(tmp_path: Path) -> None:
    world = World(tmp_path, orders_per_location=30)
    try:
        await world.by_change.refresh()
        seen = searches(world)
        before = {o.order_id: o for o in world.by_change.queue()}
        world.now += timedelta(minutes=30)
        completed = world.open_orders()[0]
        world.update(completed, "COMPLETED")
        edited = world.open_orders()[1]
        world.square.touch(edited)
        world.now += timedelta(minutes=1)
        reports = await world.by_change.refresh()
        assert all(r.refreshed for r in reports)
        # Every search asked for changes since the mark, sorted by UPDATED_AT, in every state.
        assert seen and by_change_queries(seen) == seen
        for body in seen:
            query = body["query"]
            assert query["sort"] == {"sort_field": "UPDATED_AT", "sort_order": "ASC"}
            assert set(query["filter"]["state_filter"]["states"]) == {
                "OPEN", "COMPLETED", "CANCELED", "DRAFT"}
            start = datetime.fromisoformat(
                query["filter"]["date_time_filter"]["updated_at"]["start_at"].replace(
                    "Z", "+00:00"))
            assert start == BASE - MARK_MARGIN
        after = {o.order_id: o for o in world.by_change.queue()}
        assert completed.id in before and completed.id not in after
        assert after[edited.id].version == edited.version == before[edited.id].version + 1
        # Unchanged orders are confirmed as of this refresh.
        assert {o.fetched_at for o in after.values()} == {utc_text(world.now)}
    finally:
        await world.aclose()


async def test_full_flag_and_an_old_mark_read_everything(tmp_path: Path) -> None:
    world = World(tmp_path)
    try:
        await world.by_change.refresh()
        seen = searches(world)
        await world.by_change.refresh(full=True)
        assert seen and not by_change_queries(seen)
        seen.clear()
        world.now += FULL_EVERY - timedelta(minutes=1)
        await world.by_change.refresh()
        assert seen and by_change_queries(seen) == seen
        seen.clear()
        world.now += timedelta(minutes=2)  # the last full read is now over a day old
        await world.by_change.refresh()
        assert seen and not by_change_queries(seen)
    finally:
        await world.aclose()


@pytest.mark.parametrize("change", ["consent_expires", "order_ages"])
async def test_unchanged_orders_are_classified_again_when_their_verdict_can_move(
        tmp_path: Path, change: str) -> None:
    """Nothing changed in Square, yet a verdict moved: the consent ran out, or an order grew
    older than the consent's minimum age. A refresh by change must see both."""
    world = World(tmp_path, orders_per_location=20)
    merchant = world.merchants[1].merchant.id
    try:
        if change == "order_ages":
            # A fully paid order made just now: too recent under the consent's 2 h minimum.
            location = world.merchants[1].locations[0]
            order_id = make_order(world.square, world.rng, merchant, location,
                                  "online_paid_open", world.now)
            # Two refreshes while it is young, so that the last mark is past its updated_at
            # (the payment stamps it up to 10 minutes later) less the margin.
            for _ in range(2):
                world.now += timedelta(minutes=20)
                await world.by_change.refresh()
                [row] = [o for o in world.by_change.queue(merchant) if o.order_id == order_id]
                assert row.reason == "TOO_RECENT"
            seen = searches(world)
            world.now += timedelta(hours=2)
            await world.by_change.refresh()
            # Square was not asked about it again: only time moved its verdict.
            starts = [b["query"]["filter"]["date_time_filter"]["updated_at"]["start_at"]
                      for b in seen if location.id in b["location_ids"]]
            assert starts and all(world.square.orders[order_id].updated_at < start
                                  for start in starts)
            [row] = [o for o in world.by_change.queue(merchant) if o.order_id == order_id]
            assert row.eligible and row.reason is None
        else:
            await world.by_change.refresh()
            assert any(o.eligible for o in world.by_change.queue(merchant))
            world.now += timedelta(hours=8)  # past the consent's expires_at
            await world.by_change.refresh()
            queued = world.by_change.queue(merchant)
            assert queued and not any(o.eligible for o in queued)
            assert {o.reason for o in queued} >= {"CONSENT_EXPIRED"}
    finally:
        await world.aclose()


@pytest.mark.parametrize("count", [0, 1, 3, 7])
def test_streamed_queue_json_is_print_json_byte_for_byte(
        count: int, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """`queue --json` writes its orders a chunk at a time (memory), and still writes exactly
    what `print_json` of the whole document would."""
    from console.output import print_json, print_json_stream
    orders = [{"order_id": f"O{i}", "reference_id": f"ref\n\"{i}\" ✓", "total_money":
               {"amount": i, "currency": "USD"}, "eligible": i % 2 == 0, "reason": None,
               "when": BASE, "lines": [1, {"a": []}]} for i in range(count)]
    rest = {"merchants": [{"merchant_id": "M", "stale": False, "error": None}], "n": {}}
    print_json({"orders": orders, **rest})
    whole = capsysbinary.readouterr().out
    print_json_stream("orders", iter(orders), rest, chunk=2)
    assert capsysbinary.readouterr().out == whole
    assert json.loads(whole)["orders"] == json.loads(json.dumps(orders, default=str))
