"""One logging setup: JSON lines off a terminal, readable text on one."""

from __future__ import annotations

import io
import json
import logging

from gpuagent.logsetup import setup_logging


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_lines_when_not_a_terminal() -> None:
    """A pipe gets one JSON object per line with extras as fields."""
    stream = io.StringIO()
    setup_logging("debug", "auto", stream)
    logging.getLogger("agent.test").info("lease started", extra={"lease_id": "L1", "gpus": 2})
    entry = json.loads(stream.getvalue().strip())
    assert entry["msg"] == "lease started"
    assert entry["level"] == "info"
    assert entry["logger"] == "agent.test"
    assert entry["lease_id"] == "L1" and entry["gpus"] == 2


def test_text_on_terminal_and_level_filter() -> None:
    """A terminal gets readable lines; records below the level are dropped."""
    stream = _Tty()
    setup_logging("warning", "auto", stream)
    log = logging.getLogger("agent.test")
    log.info("hidden")
    log.warning("GPU hot", extra={"gpu": 3})
    out = stream.getvalue()
    assert "hidden" not in out
    assert "WARNING" in out and "GPU hot gpu=3" in out
    assert not out.lstrip().startswith("{")


def test_exceptions_are_kept_in_json() -> None:
    """A logged exception carries its traceback in the JSON entry."""
    stream = io.StringIO()
    setup_logging("info", "json", stream)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed")
    entry = json.loads(stream.getvalue().strip())
    assert "RuntimeError: boom" in entry["exc"]
