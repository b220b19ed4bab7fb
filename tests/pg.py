"""One private PostgreSQL for the run, and a database of its own for each test.

Imported by the tests that use it (not in conftest.py: only they pay for the
server). Each test's database is a copy of a template migrated once, which
``CREATE DATABASE … TEMPLATE`` makes in milliseconds, so tests stay
independent without migrating every time.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg import sql

from gateway.store.postgres import open_postgres
from scripts.postgresql import PostgresService, start_postgres

TEMPLATE = "gateway_template"


@dataclass
class Postgres:
    service: PostgresService
    made: list[str] = field(default_factory=list)
    migrated: bool = False

    def admin(self, sql_: sql.Composed, database: str = "postgres") -> None:
        # CREATE and DROP DATABASE cannot run in a transaction: autocommit.
        with psycopg.connect(self.service.url_for(database), autocommit=True) as c:
            c.execute(sql_)

    def empty(self) -> str:
        """A new database with no tables at all; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.admin(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        self.made.append(name)
        return self.service.url_for(name)

    async def fresh(self) -> str:
        """A new database at the current schema version; its URL."""
        if not self.migrated:
            store = await open_postgres(self.service.url_for(TEMPLATE), pool_size=1)
            await store.close()
            self.migrated = True
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.admin(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(TEMPLATE)))
        self.made.append(name)
        return self.service.url_for(name)

    def drop_all(self) -> None:
        while self.made:
            name = self.made.pop()
            self.admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    # Not skipped when missing: scripts/setup.sh installs it, and CI must run these tests.
    service = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        pg = Postgres(service)
        pg.admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
        yield pg
    finally:
        service.stop()
