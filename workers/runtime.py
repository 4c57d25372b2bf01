"""Building the parts a process needs from settings: database, queue, model, live sync."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.exc import OperationalError
from tenacity import before_sleep_log, retry, retry_if_exception_type, stop_after_delay, wait_exponential

from app.db.experts import ExpertStore
from app.db.live import LiveSync
from app.db.session import Database
from app.models import LoadedModel, load_model
from app.models.loader import default_cache_dir
from app.queue import EditQueue, make_queue
from app.scen import Editor, ScenConfig
from app.settings import Settings

log = logging.getLogger(__name__)


@retry(
    retry=retry_if_exception_type(OperationalError),
    stop=stop_after_delay(60),
    wait=wait_exponential(multiplier=0.5, max=5),
    before_sleep=before_sleep_log(log, logging.WARNING),
    reraise=True,
)
def open_database(settings: Settings) -> Database:
    """Migrate (if enabled) and connect; waits up to a minute for a database that is still starting."""
    if settings.db_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.auto_migrate:
        from app.db.migrate import upgrade

        upgrade("head", url=settings.db_url)
    db = Database(settings.db_url)
    try:
        db.ping()
    except OperationalError:
        db.close()
        raise
    return db


def open_queue(settings: Settings) -> EditQueue:
    return make_queue(settings.redis_url, prefix=settings.redis_prefix, claim_idle_ms=settings.claim_idle_ms)


def build_editor(settings: Settings, loaded: LoadedModel | None = None) -> tuple[Editor, str]:
    if loaded is None:
        log.info("loading model %s", settings.model or "(bundled default)")
        loaded = load_model(settings.model, device=settings.device)
    config = ScenConfig.from_overrides(settings.engine)
    return Editor(loaded.model, loaded.tokenizer, config, cache_dir=default_cache_dir() / "pool-keys"), loaded.name


@dataclass
class Live:
    editor: Editor
    model_name: str
    store: ExpertStore
    sync: LiveSync


def build_live(settings: Settings, db: Database, loaded: LoadedModel | None = None) -> Live:
    editor, name = build_editor(settings, loaded)
    store = ExpertStore(settings.data_dir)
    sync = LiveSync(editor, db, store)
    sync.reconcile()
    return Live(editor, name, store, sync)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(settings: Settings) -> None:
    if not settings.log_json:
        return
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter())
