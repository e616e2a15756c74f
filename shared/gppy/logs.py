"""Structured (JSON) logging with night id, frame and stage in every line.

Every line goes to stderr (the container log). With ``unit_log_root`` (``path_log`` of
path.json), the lines that belong to a night are also appended to v1's per-unit log folder:
``<path_log>/<UNIT>/<night folder>.log`` (JSON lines from every stage of that night).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

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


_UNIT = re.compile(r"[A-Za-z0-9+\-]+")
_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-_]*")


class UnitLogHandler(logging.Handler):
    """Appends the records of a night to ``<root>/<UNIT>/<night folder>.log``.

    The night comes from the ``night`` context variable (``<UNIT>_<night folder>``, as
    :func:`gppy.naming.night_id` makes it); records outside a night, or with a night id that is
    not of that form, are not written here. Each record is one ``write`` on a file opened in
    append mode, so the processes of one machine can share a file.
    """

    def __init__(self, root: str | os.PathLike, level: int = logging.NOTSET):
        super().__init__(level)
        self.root = Path(root)
        self.setFormatter(JsonFormatter())

    def path_for(self, night_id: str) -> Path | None:
        """The log file of ``night_id``, or None when the id is not ``<UNIT>_<folder>``."""
        unit, _, folder = night_id.partition("_")
        if not _UNIT.fullmatch(unit) or not _FOLDER.fullmatch(folder):
            return None
        return self.root / unit / f"{folder}.log"

    def emit(self, record: logging.LogRecord) -> None:
        night = night_var.get()
        path = self.path_for(night) if night else None
        if path is None:
            return
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except Exception:
            self.handleError(record)


def setup_logging(stage: str, json_lines: bool = True, level: int = logging.INFO,
                  unit_log_root: str | os.PathLike | None = None) -> None:
    """Log to stderr (JSON lines or text) and, with ``unit_log_root``, per night and unit."""
    stage_var.set(stage)
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {stage} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if unit_log_root is not None:
        root.addHandler(UnitLogHandler(unit_log_root))
    root.setLevel(level)
    for noisy in ("nats", "uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
