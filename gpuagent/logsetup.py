"""One logging setup for both programs.

A terminal gets readable lines; anything else (journald, a file, a pipe to a log
shipper) gets one JSON object per line so aggregators need no parsing rules.
Library code only ever calls ``logging.getLogger(__name__)``; structured context
goes in ``extra={...}`` and ends up as JSON fields.

Under systemd, stderr is a journald stream that files every line at the unit's
default priority (info) unless the line starts with a syslog ``<N>`` prefix
(``SyslogLevelPrefix=``, on by default). Without it ``journalctl -p err`` finds
none of our errors, so lines get the prefix whenever stderr is that stream.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
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


# syslog(3) priorities, as journald reads them from a "<N>" line prefix.
_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
LOG_ERR = 3


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (custom levels round down to the next name)."""
    for level in sorted(_SYSLOG_PRIORITY, reverse=True):
        if levelno >= level:
            return _SYSLOG_PRIORITY[level]
    return 7


def is_journal_stream(stream: TextIO) -> bool:
    """True when ``stream`` is the journald stream systemd connected us to.

    systemd sets ``JOURNAL_STREAM=<device>:<inode>`` for the stdout/stderr it
    wired to journald; a child that inherited the variable but writes to a pipe or
    a file must not get prefixes, so the stream's own fd is compared.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False  # io.StringIO and closed streams have no fd
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def prefix_lines(text: str, priority: int) -> str:
    """Every line of ``text`` with ``<priority>``: journald splits multi-line
    messages (text-format tracebacks) into entries and reads each one's prefix."""
    return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


def stderr_error(text: str, stream: TextIO | None = None) -> None:
    """Print a line for the operator at error priority (``journalctl -p err``).

    For messages printed rather than logged (preflight results, fatal start
    errors), which must be as findable as logged errors.
    """
    out = stream if stream is not None else sys.stderr
    print(prefix_lines(text, LOG_ERR) if is_journal_stream(out) else text, file=out)


def enable_fault_tracebacks(stream: TextIO | None = None) -> None:
    """Dump every thread's Python stack when a fatal signal arrives.

    systemd's watchdog kills a stuck service with SIGABRT (``WatchdogSignal=``);
    faulthandler's C-level handler runs even when the event loop is blocked in
    C code or the GIL is held, writes the stacks, then lets the signal kill the
    process as before (``enable`` covers SIGABRT, SIGSEGV, SIGFPE, SIGBUS, SIGILL;
    tests/test_logsetup.py checks SIGABRT with a real process).
    """
    faulthandler.enable(file=stream if stream is not None else sys.stderr, all_threads=True)


class _SyslogPrefix(logging.Formatter):
    """Wraps a formatter and prefixes its lines with the record's syslog priority."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return prefix_lines(self._inner.format(record), syslog_priority(record.levelno))


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
    level: LogLevel | str = "info",
    fmt: LogFormat | str = "auto",
    stream: TextIO | None = None,
    *,
    syslog_prefix: bool | None = None,
) -> None:
    """Configure the root logger once; safe to call again (e.g. on SIGHUP).

    ``syslog_prefix`` None: prefix lines with ``<N>`` when ``stream`` is journald's.
    """
    stream = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    if syslog_prefix is None:
        syslog_prefix = is_journal_stream(stream)
    formatter: logging.Formatter = JsonFormatter() if use_json else TextFormatter()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_SyslogPrefix(formatter) if syslog_prefix else formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # grpc and docker's urllib3 are chatty at debug and say nothing we act on at info.
    for noisy in ("urllib3", "docker", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
