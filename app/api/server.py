"""``scen serve``: uvicorn around the app factory."""

from __future__ import annotations

import logging

import uvicorn

from app.api.app import create_app
from app.settings import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    mode = "embedded worker, in-process queue" if settings.redis_url is None else f"Redis {settings.redis_url}"
    log.info("serving on http://%s:%d (data in %s; %s)", host, port, settings.data_dir, mode)
    # log_config=None keeps the logging set up by the CLI.
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None)
