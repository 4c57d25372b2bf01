"""Building what a process serves from settings: its database, its queue, and the served model."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.exc import OperationalError
from tenacity import before_sleep_log, retry, retry_if_exception_type, stop_after_delay, wait_exponential

from app.db.migrate import upgrade
from app.db.session import Database
from app.live.experts import Experts, open_experts
from app.live.routing_table import NAME as ROUTING_TABLE
from app.live.routing_table import RoutingTable
from app.live.sync import LiveSync
from app.models import LoadedModel, load_model
from app.queue import EditQueue, make_queue
from app.scen import Editor
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
    if settings.auto_migrate:
        upgrade("head", settings.db_url)
    db = Database(settings.db_url)
    try:
        db.ping()
    except OperationalError:
        db.close()
        raise
    return db


def open_queue(settings: Settings) -> EditQueue:
    return make_queue(settings.queue_url, prefix=settings.redis_prefix, claim_idle_ms=settings.claim_idle_ms)


@dataclass
class ServedModel:
    """The model a process answers with, and what keeps its edits equal to the database."""

    editor: Editor
    model_name: str
    experts: Experts
    sync: LiveSync


def load_configured_model(settings: Settings) -> LoadedModel:
    log.info("loading model %s", settings.model or "(bundled default)")
    return load_model(settings.model, device=settings.device, cache_dir=settings.cache_dir)


def new_editor(settings: Settings, loaded: LoadedModel) -> Editor:
    """An editor of ``loaded`` with the routing pool's keys cached under ``settings.cache_dir``."""
    return Editor(loaded.model, loaded.tokenizer, settings.engine_config, cache_dir=settings.cache_dir / "pool-keys")


def build_served_model(
    settings: Settings, db: Database, loaded: LoadedModel | None = None, write_table: bool = True
) -> ServedModel:
    """Load ``settings.model`` (unless ``loaded`` is given) and bring every active edit live.

    The routing parts come from the data directory's routing table where it has them; with
    ``write_table`` a start that read many of them from the store writes a new table (a
    process started beside another that does, such as the embedded worker, need not)."""
    if loaded is None:
        loaded = load_configured_model(settings)
    editor = new_editor(settings, loaded)
    experts = open_experts(settings, db)
    table = RoutingTable(settings.data_dir / ROUTING_TABLE, rewrite_after=1000 if write_table else None)
    sync = LiveSync(editor, db, experts, table)
    budget = settings.expert_cache_mb
    editor.page_experts(None if budget is None else int(budget * 2**20), sync.load_expert)
    sync.reconcile()
    # With many live edits the router reads candidates from an index: built now, the first
    # prompt does not wait for it.
    editor.routed.router.index_now()
    return ServedModel(editor, loaded.name, experts, sync)
