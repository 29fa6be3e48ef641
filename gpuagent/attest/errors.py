"""The prover's refusal, in a module without numpy.

The agent daemon catches it on every challenge but must not import numpy (and
hold its ~12 MB) until a challenge actually arrives (docs/performance.md).
"""

from __future__ import annotations


class ProverError(ValueError):
    """A challenge or reveal the prover refuses, with what was wrong."""
