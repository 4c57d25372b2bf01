"""Processes starting together on a new PostgreSQL database (an API and its workers) all migrate
it at start-up; every one must come up (found by tests/faults: a worker died on the unique
violation of a second CREATE TABLE alembic_version)."""

from __future__ import annotations

import threading

import sqlalchemy as sa

from app.db.migrate import upgrade


def test_concurrent_upgrades_of_a_new_database(postgres_url):
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def migrate() -> None:
        start.wait()
        try:
            upgrade("head", postgres_url)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1
    engine.dispose()
