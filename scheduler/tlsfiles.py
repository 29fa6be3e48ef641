"""Where the scheduler keeps its generated TLS files (beside the database).

Its own small module so client commands find the CA without importing the server
(and with it numpy and the attestation verifier).
"""

from __future__ import annotations

from pathlib import Path

from .config import SchedulerConfig


def tls_dir(config: SchedulerConfig) -> Path:
    """Where the auto-generated CA and certificate live (beside the database)."""
    return config.database.path.parent / "tls"
