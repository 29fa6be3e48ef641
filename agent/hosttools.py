"""Run a host tool (iptables-save, mkfs.ext4, mount) with a deadline.

The deadline is a timer that kills the child, not ``subprocess.run(timeout=...)``:
that one waits in a timed ``poll`` which libfaketime (the fault suite's clock
steps, preloaded into the agent) breaks with EINVAL, while the timer runs on the
monotonic clock. Blocking: call from a worker thread.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Sequence


def run_tool(
    argv: Sequence[str], stdin: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; the result carries returncode -9 when the deadline killed it.

    Raises OSError when the tool cannot be started.
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    timer = threading.Timer(timeout, proc.kill)
    timer.daemon = True
    timer.start()
    try:
        out, err = proc.communicate(stdin)
    finally:
        timer.cancel()
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
