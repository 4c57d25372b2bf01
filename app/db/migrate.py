"""Running the Alembic migrations (the top-level ``migrations`` package, installed with the project)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

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


def upgrade(revision: str, url: str) -> None:
    log.info("upgrading database schema to %s", revision)
    command.upgrade(alembic_config(url), revision)


def downgrade(revision: str, url: str) -> None:
    command.downgrade(alembic_config(url), revision)
