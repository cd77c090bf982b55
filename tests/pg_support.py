"""PostgreSQL for tests: one throwaway cluster per test process, a fresh database per test.

`pg_url` gives a test its own database (CREATE DATABASE from a template: a few tens of ms) on a
cluster started once per session (per xdist worker) by `services/postgres_cluster.py`.

Without PostgreSQL on the machine those tests are skipped, and the run's summary says why in one
line (`pytest_terminal_summary` in conftest.py). With RECON_REQUIRE_POSTGRES=1 (`.ci/run` sets
it) they fail instead: CI must never pass by skipping the PostgreSQL half.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pytest

from services.postgres_cluster import LocalCluster, PostgresUnavailable, start_cluster

__all__ = ["REQUIRE_ENV", "SKIP_PREFIX", "fresh_database", "pg_cluster", "pg_url",
           "postgres_unavailable", "set_template_setup"]

REQUIRE_ENV = "RECON_REQUIRE_POSTGRES"
SKIP_PREFIX = "PostgreSQL unavailable"
TEMPLATE = "recon_template"
_numbers = itertools.count(1)
_template_setup: list[Callable[[str], Any]] = []


def postgres_unavailable(reason: str) -> NoReturn:
    """Skip (a laptop without PostgreSQL can still run the SQLite half), or fail under CI."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{SKIP_PREFIX} but {REQUIRE_ENV}=1: {reason}", pytrace=False)
    pytest.skip(f"{SKIP_PREFIX}: {reason}")


def set_template_setup(setup: Callable[[str], Any]) -> None:
    """Run `setup(url)` once on the template database (e.g. the store's migrations), so every
    test database is created already migrated. Call before the first `pg_url` is made."""
    _template_setup.append(setup)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalCluster]:
    failure = getattr(pg_cluster, "failure", None)
    if failure:  # tried once in this process already: don't initdb again for every test
        postgres_unavailable(failure)
    try:
        cluster = start_cluster(for_tests=True)
    except PostgresUnavailable as error:
        pg_cluster.failure = str(error)  # type: ignore[attr-defined]
        postgres_unavailable(str(error))
    try:
        import psycopg
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE}")
        for setup in _template_setup:
            setup(cluster.url(TEMPLATE))
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def fresh_database(cluster: LocalCluster) -> Iterator[str]:
    """A new database copied from the template; dropped (connections and all) afterwards."""
    import psycopg
    name = f"t{os.getpid()}_{next(_numbers)}"
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
    try:
        yield cluster.url(name)
    finally:
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_url(pg_cluster: LocalCluster) -> Iterator[str]:
    """A fresh, empty (or template-migrated) database of its own for this test."""
    with fresh_database(pg_cluster) as url:
        yield url
