"""Structured logs: one JSON object per line (time, level, logger, message, and whatever context the caller passes
with ``extra={"ctx": {...}}``: request id, route, status, duration, actor, device id). Never a secret: the access
log records the route template, not the raw URL, and no headers."""

from __future__ import annotations

import json
import logging
import time

CONTEXT = "ctx"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        doc.update(getattr(record, CONTEXT, None) or {})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def access(logger: logging.Logger, *, method: str, route: str, status: int, started: float, request_id: str) -> None:
    logger.info("request", extra={CONTEXT: {"method": method, "route": route, "status": status,
                                            "ms": round((time.perf_counter() - started) * 1e3, 2),
                                            "request_id": request_id}})
