"""What a preflight check returns: shared by ``doctor`` and the isolation host checks."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Severity(enum.StrEnum):
    OK = "ok"
    INFO = "info"
    WARNING = "warning"
    FATAL = "fatal"


@dataclass(frozen=True)
class CheckResult:
    name: str
    severity: Severity
    message: str
    fix: str | None = None
