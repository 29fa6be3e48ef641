"""One logging setup: JSON lines off a terminal, readable text on one."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from gpuagent.logsetup import is_journal_stream, setup_logging


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


def _journal_env(path: Path) -> dict[str, str]:
    """JOURNAL_STREAM naming ``path`` as systemd names the stream it connected."""
    st = path.stat()
    return {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_journald_stream_gets_syslog_priority_prefixes(tmp_path: Path) -> None:
    """On journald's stream each line starts with its syslog priority, so
    ``journalctl -p err`` finds errors; debug, info and warning map to 7, 6, 4."""
    out = tmp_path / "stderr"
    code = (
        "import logging, sys\n"
        "from gpuagent.logsetup import setup_logging\n"
        "setup_logging('debug', 'json')\n"
        "log = logging.getLogger('t')\n"
        "log.debug('d'); log.info('i'); log.warning('w'); log.error('e'); log.critical('c')\n"
    )
    with out.open("w") as stream:
        out_env = _journal_env(out)
        subprocess.run([sys.executable, "-c", code], stderr=stream, env=out_env, check=True)
    lines = out.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert json.loads(lines[3][3:])["msg"] == "e"


def test_no_prefix_when_journal_stream_names_another_file(tmp_path: Path) -> None:
    """A child that inherited JOURNAL_STREAM but writes elsewhere (a pipe, a file)
    gets plain lines: the prefix is only for the stream journald reads."""
    other = tmp_path / "other"
    other.touch()
    stream = io.StringIO()
    os.environ["JOURNAL_STREAM"] = "1:1"
    try:
        assert not is_journal_stream(stream)
        with other.open("w") as f:
            assert not is_journal_stream(f)
    finally:
        del os.environ["JOURNAL_STREAM"]
    setup_logging("info", "json", stream)
    logging.getLogger("x").error("plain")
    assert stream.getvalue().startswith("{")


def test_multiline_text_gets_a_prefix_on_every_line() -> None:
    """journald files each line of a text traceback as its own entry, so each one
    carries the priority."""
    stream = io.StringIO()
    setup_logging("info", "text", stream, syslog_prefix=True)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("x").exception("failed")
    lines = stream.getvalue().rstrip("\n").split("\n")
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines), lines


def test_printed_errors_get_error_priority_on_the_journal(tmp_path: Path) -> None:
    """Fatal start errors are printed, not logged; on the journal they are errors too."""
    out = tmp_path / "stderr"
    code = (
        "from gpuagent.logsetup import stderr_error\n"
        "stderr_error('error: preflight: x\\n  fix: y')\n"
    )
    with out.open("w") as stream:
        env = _journal_env(out)
        subprocess.run([sys.executable, "-c", code], stderr=stream, env=env, check=True)
    assert out.read_text() == "<3>error: preflight: x\n<3>  fix: y\n"


def test_sigabrt_prints_every_threads_traceback(tmp_path: Path) -> None:
    """systemd's watchdog kills a stuck service with SIGABRT: the dying process
    leaves the stack it was stuck in on stderr (the journal) and still dies of
    SIGABRT, so systemd records the watchdog failure as before."""
    code = (
        "import sys, time\n"
        "from gpuagent.logsetup import enable_fault_tracebacks\n"
        "enable_fault_tracebacks()\n"
        "def stuck_in_the_event_loop():\n"
        "    print('ready', flush=True)\n"
        "    while True:\n"
        "        time.sleep(3600)\n"
        "stuck_in_the_event_loop()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGABRT
    assert "Fatal Python error: Aborted" in err
    assert "stuck_in_the_event_loop" in err


def test_daemons_enable_fault_tracebacks() -> None:
    """Both daemons' entry points turn the SIGABRT traceback on."""
    import agent.cmd_run
    import scheduler.cmd_serve

    for module in (agent.cmd_run, scheduler.cmd_serve):
        assert "enable_fault_tracebacks()" in Path(module.__file__ or "").read_text()
