"""Structured (JSON) logging with night id, frame and stage in every line."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

night_var: contextvars.ContextVar[str] = contextvars.ContextVar("night", default="")
frame_var: contextvars.ContextVar[str] = contextvars.ContextVar("frame", default="")
stage_var: contextvars.ContextVar[str] = contextvars.ContextVar("stage", default="")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "stage": stage_var.get(),
            "night": night_var.get(),
            "frame": frame_var.get(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(stage: str, json_lines: bool = True, level: int = logging.INFO) -> None:
    stage_var.set(stage)
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {stage} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("nats", "uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
