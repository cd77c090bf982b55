"""The backlog chart's day counts (issue 11), counted by the database from the stored text, are
exactly what `age_buckets` gives over the orders that existed then, edges included, on both
stores: a first snapshot (today and the 29 days rebuilt before it) and a later one, over random
creation times, some exactly on a bucket's edge or a day's boundary, some in the future (clock
skew), and some written in another form than Square's (those are parsed in Python)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.settings import ReconSettings
from services.square_gateway import SquareGateway
from services.storage import open_store
from services.storage.base import ORDER_COLUMNS, Store
from services.storage.sqlite import SQLiteStore
from services.timestamps import parse_time
from services.workspace import Workspace, age_buckets
from tests.pg_support import set_template_setup

set_template_setup(lambda url: open_store(url).close())  # test databases start migrated

DAYS = 30


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        opened: Store = SQLiteStore(tmp_path / "backlog.db")
    else:
        opened = open_store(request.getfixturevalue("pg_url"))
    yield opened
    opened.close()


def square_text(moment: datetime) -> str:
    """Square's form: UTC, milliseconds (below)."""
    moment = moment.astimezone(UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def other_text(moment: datetime, rng: random.Random) -> str:
    """`moment` in a form Python reads but whose text does not sort as its time."""
    zone = timezone(timedelta(minutes=rng.choice([-600, -330, 60, 330, 840])))
    return rng.choice([
        lambda: moment.astimezone(UTC).isoformat(),                          # +00:00, µs
        lambda: moment.astimezone(UTC).isoformat().replace("+00:00", "Z"),  # µs, Z
        lambda: moment.astimezone(UTC).isoformat(timespec="seconds")[:19] + "Z",
        lambda: moment.astimezone(zone).isoformat(timespec="milliseconds"),
    ])()


def reference(created: list[str], now: datetime) -> dict[str, tuple[int, ...]]:
    """What the chart has always meant, computed the slow way: today's candidates by age now;
    each earlier day, those created by then, at their age then."""
    today = now.astimezone(UTC).date()
    orders = [SimpleNamespace(created_at=text) for text in created]
    days = {today.isoformat(): age_buckets(orders, now)}  # type: ignore[arg-type]
    for back in range(1, DAYS):
        moment = now - timedelta(days=back)
        existing = [o for o in orders if parse_time(o.created_at) <= moment]
        days[(today - timedelta(days=back)).isoformat()] = age_buckets(
            existing, moment)  # type: ignore[arg-type]
    return days


def random_times(rng: random.Random, now: datetime, count: int) -> list[datetime]:
    """Around every edge a count can move on: now - d days (d = 0..44) exactly, a millisecond
    either side, midnights, and anywhere in 45 days back and 2 ahead."""
    moments = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.4:
            edge = now - timedelta(days=rng.randint(0, 44))
            moments.append(edge + timedelta(milliseconds=rng.choice([-1, 0, 0, 1])))
        elif kind < 0.5:
            midnight = datetime.combine(now.date() - timedelta(days=rng.randint(0, 44)),
                                        datetime.min.time(), UTC)
            moments.append(midnight + timedelta(milliseconds=rng.choice([-1, 0, 1])))
        else:
            moments.append(now + timedelta(microseconds=rng.randint(-45 * 86400 * 10**6,
                                                                      2 * 86400 * 10**6)))
    return moments


def order_row(merchant_id: str, order_id: str, created_at: str, eligible: int
              ) -> tuple[object, ...]:
    values = {"order_id": order_id, "merchant_id": merchant_id, "location_id": "L",
              "version": 1, "state": "OPEN", "source": "Square Online", "reference_id": None,
              "total_amount": 100, "currency": "USD", "due_amount": 0, "created_at": created_at,
              "updated_at": None, "eligible": eligible, "reason": None, "detail": "",
              "consent_id": None, "fulfillments": "", "order_json": "{}",
              "seen_at": "2026-12-01T00:00:00.000Z"}
    return tuple(values[c] for c in ORDER_COLUMNS)


def write(store: Store, merchant_id: str, texts: list[str], start: int) -> None:
    rows = [order_row(merchant_id, f"{merchant_id}-{index}", text, 1)
            for index, text in enumerate(texts, start)]
    # Not a candidate: never counted, whatever its time.
    rows.append(order_row(merchant_id, f"{merchant_id}-x{start}", "2026-12-01T00:00:00.000Z",
                          0))
    with store.transaction():
        store.write_orders(rows)


def test_database_counts_are_the_slow_counts(store: Store, tmp_path: Path) -> None:
    rng = random.Random(11)
    clock = [datetime(2026, 12, 2, 9, 0, tzinfo=UTC)]
    settings = ReconSettings(db=tmp_path / "unused.db", credentials=tmp_path / "none.toml")
    workspace = Workspace(settings=settings, store=store,
                          gateway=SquareGateway(settings.base_url), clock=lambda: clock[0])
    parsed: list[str] = []
    read = store.candidate_created_at
    store.candidate_created_at = lambda m: (parsed.append(m), read(m))[1]  # type: ignore
    created: dict[str, list[str]] = {}
    for round_ in range(4):
        # Now: sometimes on a millisecond (an order can sit exactly on an edge), sometimes not.
        clock[0] += timedelta(hours=rng.randint(0, 40), microseconds=rng.choice(
            [0, 0, rng.randint(1, 999), rng.randint(1000, 10**6)]))
        now = clock[0]
        for number in range(5):  # new merchants (a first snapshot) and the earlier ones again
            merchant_id = f"R{round_}M{number}"
            created[merchant_id] = []
        other_form = {f"R{round_}M4"}  # one merchant per round has a time in another form
        for merchant_id in created:
            moments = random_times(rng, now, rng.randint(0, 60))
            texts = [square_text(m) for m in moments]
            if merchant_id in other_form and moments:
                texts[0] = other_text(moments[0], rng)
            write(store, merchant_id, texts, len(created[merchant_id]))
            created[merchant_id] += texts
        parsed.clear()
        workspace.record_backlog(list(created))
        today = now.astimezone(UTC).date()
        for merchant_id, texts in created.items():
            expected = reference(texts, now)
            stored = store.backlog_history(merchant_id, (today - timedelta(days=DAYS)).isoformat())
            first = merchant_id.startswith(f"R{round_}")
            assert stored[today.isoformat()] == (expected[today.isoformat()], False), \
                (merchant_id, now)
            if first:  # the days before a first snapshot, rebuilt from the orders open now
                for day, counts in expected.items():
                    if day != today.isoformat():
                        assert stored[day] == (counts, True), (merchant_id, day, now)
        # The database counted every merchant whose times are all in Square's form.
        assert set(parsed) <= {m for m, texts in created.items()
                               if any(not t.endswith("Z") or len(t) != 24 for t in texts)}
        assert set(parsed) >= other_form & {m for m in created if created[m]}


@pytest.mark.parametrize("text", [
    "2026-01-01 10:00:00.000Z", "2026-01-01T10:00:00,000Z", "2026-01-01T10:00:00.000+00:00",
    "2026-01-01T10:00:00Z", "2026-01-01T10:00:00.123456Z", "2026-01-01T10:00:00.12Z",
    "2026-W01-4T10:00:00.000Z", "20260101T100000.000Z", "not a time"])
def test_times_in_another_form_are_left_to_python(store: Store, text: str) -> None:
    """Their text need not sort as their time: Python reads (or refuses) them, as always."""
    write(store, "M", ["2026-01-01T10:00:00.000Z", text], 0)
    assert store.candidates_by_age(["M"], ["2026-01-01T10:00:00.000Z"]) == {"M": None}


def test_times_in_square_form_are_counted_by_the_database(store: Store) -> None:
    write(store, "M", ["2028-02-29T23:59:59.999Z", "2026-12-31T00:00:00.000Z",
                       "2026-04-30T10:00:00.001Z"], 0)
    edges = ["2027-01-01T00:00:00.000Z", "2026-12-31T00:00:00.000Z",
             "2026-04-30T10:00:00.001Z", "2026-04-30T10:00:00.000Z"]
    assert store.candidates_by_age(["M", "nobody"], edges) == {"M": (3, 2, 2, 1, 0)}
    assert store.candidates_by_age([], edges) == {}
