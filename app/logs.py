"""Log output of the ``scen`` processes: plain lines, or one JSON object per line for log shippers.

A line logged while an HTTP request is handled carries the request's id (``X-Request-Id``); a
worker's lines about an edit carry the edit's id and the id of the request that queued it, so
one id follows an edit from its post to its activation across processes.

In JSON mode nothing else reaches stderr: third-party progress bars are off, and the loggers of
transformers and of Python's warnings write through the same JSON handler.
"""

from __future__ import annotations

import json
import logging
import os
from contextvars import ContextVar

# The id of the HTTP request being handled (set by app.api.requestid), or of the request that
# queued the edit a worker is handling; else None.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
# The edit a worker is handling, else None.
edit_id_var: ContextVar[str | None] = ContextVar("edit_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        edit_id = edit_id_var.get()
        if edit_id is not None:
            entry["edit_id"] = edit_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = request_id_var.get()
        if request_id is None:
            return line
        first, sep, rest = line.partition("\n")  # after the message, before any traceback
        return f"{first} [request {request_id}]{sep}{rest}"


NOISY_AT_INFO = ("faiss.loader", "alembic.runtime.plugins")


def configure_logging(verbose: bool = False, json_lines: bool = False) -> None:
    """Log to stderr at INFO (DEBUG when ``verbose``). A process that already set up
    logging (a test runner, an embedding application) keeps its handlers and levels."""
    fmt = "%(asctime)s %(levelname)s %(name)s %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter(fmt))
    if not verbose:
        # Each start they report at INFO which builds of faiss they tried and which alembic
        # plugins they set up: lines that say nothing about this service.
        for name in NOISY_AT_INFO:
            logging.getLogger(name).setLevel(logging.WARNING)
    if json_lines:
        quiet_third_parties()


def quiet_third_parties() -> None:
    """Progress bars off (tqdm, Hugging Face), and library output through our handlers."""
    # Read when those libraries are imported, which comes later in every command.
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "warning"
    logging.captureWarnings(True)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    # transformers writes to a handler of its own; ours formats its lines as JSON instead.
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
