"""Log output of the ``scen`` processes: plain lines, or one JSON object per line for log shippers.

A line logged while an HTTP request is handled carries the request's id (``X-Request-Id``).
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar

# The id of the HTTP request being handled (set by app.api.requestid), else None.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)


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


def configure_logging(verbose: bool = False, json_lines: bool = False) -> None:
    """Log to stderr at INFO (DEBUG when ``verbose``). A process that already set up
    logging (a test runner, an embedding application) keeps its handlers and levels."""
    fmt = "%(asctime)s %(levelname)s %(name)s %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter(fmt))
