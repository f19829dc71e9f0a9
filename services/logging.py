"""Structured logs: one JSON object per line on stderr, carrying the request id of the RPC being served.

The id lives in a context variable set by the server for each RPC (and turn), so every record logged while
serving it carries `request_id` without passing it around. Extra fields: `log.info("msg", extra={"fields": {...}})`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("request_id", default="")
trace_id_var: ContextVar[str] = ContextVar("trace_id", default="")  # set by services.tracing when on
key_id_var: ContextVar[str] = ContextVar("key_id", default="")  # the caller's API key id (services.auth), never the key

LOGGER_NAME = "moss_speech.service"


def new_request_id() -> str:
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", "") or request_id_var.get(),
        }
        if trace_id := trace_id_var.get():
            entry["trace_id"] = trace_id
        if key_id := key_id_var.get():
            entry["key_id"] = key_id
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        rid = request_id_var.get()
        if key_id := key_id_var.get():
            rid = f"{rid or '-'} key={key_id}"
        fields = " ".join(f"{k}={v}" for k, v in (getattr(record, "fields", None) or {}).items())
        line = f"{self.formatTime(record)} {record.levelname} {record.name} [{rid or '-'}] {record.getMessage()}"
        line = f"{line} {fields}" if fields else line
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def setup_logging(level: str = "INFO", fmt: str = "json", stream=None) -> logging.Logger:
    """Configure the service logger (idempotent: replaces its handler)."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return logger


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)
