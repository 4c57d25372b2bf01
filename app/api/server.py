"""``scen serve``: uvicorn around the app factory."""

from __future__ import annotations

import logging

import uvicorn
from sqlalchemy import inspect
from sqlalchemy.exc import SQLAlchemyError

from app.api.app import create_app
from app.api.auth import KeyRing, check_exposure
from app.db.models import ApiKey
from app.db.session import Database
from app.settings import Settings, redact_url

log = logging.getLogger(__name__)


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until stopped. Raises ``SystemExit`` with the reason when the model cannot be
    served (a model the engine settings do not fit, say): a process that could never become
    ready should stop where its supervisor sees it, not linger answering 503."""
    refused = check_exposure(host, _has_keys(settings), settings.allow_open)
    if refused:
        raise SystemExit(f"scen serve: {refused}")
    queue_url = settings.queue_url
    mode = "embedded worker, in-process queue" if queue_url is None else f"Redis {redact_url(queue_url)}"
    log.info("serving on http://%s:%d (data in %s; %s)", host, port, settings.data_dir, mode)
    fatal: list[str] = []

    def stop(reason: str) -> None:
        fatal.append(reason)
        server.should_exit = True

    # log_config=None keeps the logging set up by the CLI.
    server = uvicorn.Server(uvicorn.Config(create_app(settings, on_fatal=stop), host=host, port=port,
                                           log_config=None))
    server.run()
    if fatal:
        raise SystemExit(f"scen serve stopped: {fatal[0]}")


def _has_keys(settings: Settings) -> bool:
    if settings.api_key_entries:
        return True
    db = Database(settings.db_url)
    try:
        # A database not made yet (the first start migrates it later) has none, and is no reason to warn.
        if not _has_key_table(db):
            return False
        return KeyRing([], db).stored > 0
    finally:
        db.close()


def _has_key_table(db: Database) -> bool:
    try:
        return inspect(db.engine).has_table(ApiKey.__tablename__)
    except SQLAlchemyError:
        return True  # unreachable: KeyRing says so and keeps none
