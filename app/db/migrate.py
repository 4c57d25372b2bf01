"""Running the Alembic migrations (the top-level ``migrations`` package, installed with the project)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)


def _script_location() -> Path:
    spec = importlib.util.find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the migrations package is missing: install the project (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations)))


SCRIPT_LOCATION = _script_location()


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    # Percent signs in URLs (encoded passwords, options) would read as interpolation.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


# Any constant: the key of the PostgreSQL advisory lock that makes migrations take turns.
_MIGRATION_LOCK = 0x5CE1_0001


@contextlib.contextmanager
def _one_at_a_time(url: str) -> Iterator[None]:
    """An API and its workers starting together each migrate at start-up; unserialised, two of
    them create ``alembic_version`` at once and one dies on the unique violation. On PostgreSQL
    they take turns through an advisory lock (released with the connection, should a process die)
    and the later ones find the schema done."""
    if not url.startswith("postgresql"):
        yield
        return
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})
                conn.commit()
    finally:
        engine.dispose()


def upgrade(revision: str, url: str) -> None:
    log.info("upgrading database schema to %s", revision)
    with _one_at_a_time(url):
        command.upgrade(alembic_config(url), revision)


def downgrade(revision: str, url: str) -> None:
    command.downgrade(alembic_config(url), revision)
