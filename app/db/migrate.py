"""Running the Alembic migrations (the top-level ``migrations`` package, installed with the project)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

log = logging.getLogger(__name__)

SCRIPT_LOCATION = Path(next(iter(importlib.util.find_spec("migrations").submodule_search_locations)))


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    # Percent signs in URLs (encoded passwords, options) would read as interpolation.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(revision: str = "head", url: str | None = None) -> None:
    if url is None:
        from app.settings import get_settings

        settings = get_settings()
        url = settings.db_url
        if url.startswith("sqlite"):
            settings.data_dir.mkdir(parents=True, exist_ok=True)
    log.info("upgrading database schema to %s", revision)
    command.upgrade(alembic_config(url), revision)


def downgrade(revision: str, url: str) -> None:
    command.downgrade(alembic_config(url), revision)
