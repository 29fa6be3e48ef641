"""One logging setup for both programs.

A terminal gets readable lines; anything else (journald, a file, a pipe to a log
shipper) gets one JSON object per line so aggregators need no parsing rules.
Library code only ever calls ``logging.getLogger(__name__)``; structured context
goes in ``extra={...}`` and ends up as JSON fields.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

from .text import escape_controls

LogFormat = Literal["auto", "text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]

# Attributes every LogRecord has; anything else came from ``extra=`` and is context.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Values in messages come from buyers and agents: a newline in an image name
        # must not start a forged line (tracebacks, appended after this, keep theirs).
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={escape_controls(str(v))}" for k, v in extras.items())
        return line


def setup_logging(
    level: LogLevel | str = "info", fmt: LogFormat | str = "auto", stream: TextIO | None = None
) -> None:
    """Configure the root logger once; safe to call again (e.g. on SIGHUP)."""
    stream = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # grpc and docker's urllib3 are chatty at debug and say nothing we act on at info.
    for noisy in ("urllib3", "docker", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
