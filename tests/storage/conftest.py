"""Fixtures for the storage tests: every test that touches a database runs on SQLite and PostgreSQL.

PostgreSQL comes from MEMCHAT_TEST_POSTGRES_URL (scripts/start-test-postgres.sh starts a server and
prints one). Without it those cases are skipped, except under CI=true, where they fail: CI must
never pass without having tested PostgreSQL. Each test gets a clean database: a new SQLite file,
or a new PostgreSQL schema (dropped afterwards) that the test's connections use as search_path.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url

from storage import Storage, upgrade
from tests.storage.helpers import FAST, PASSWORD

POSTGRES_ENV = "MEMCHAT_TEST_POSTGRES_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'memchat.db'}"
        return
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{POSTGRES_ENV} is not set, but CI=true: CI must test PostgreSQL too "
                        "(.ci/run starts a server with scripts/start-test-postgres.sh)")
        pytest.skip(f"PostgreSQL not configured: set {POSTGRES_ENV} "
                    "(export MEMCHAT_TEST_POSTGRES_URL=\"$(scripts/start-test-postgres.sh)\")")
    schema = f"test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(base)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def storage(db_url: str, data_dir: Path) -> Iterator[Storage]:
    upgrade(db_url, settings=FAST)
    with Storage(db_url, data_dir, FAST) as store:
        yield store


@pytest.fixture
def alice(storage: Storage):
    return storage.create_user("alice", PASSWORD)


@pytest.fixture
def bob(storage: Storage):
    return storage.create_user("bob", PASSWORD)
