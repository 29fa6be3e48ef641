"""The egress policy switched off on a host without iptables (a container, a minimal
system): nothing to remove, so nothing fails and leases are not refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import IsolationConfig
from agent.isolation.firewall import Firewall


def test_policy_off_without_iptables_is_a_no_op(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ensure() with the policy off removes old rules; with no iptables-save on PATH
    there can be none, so it returns False instead of failing every lease start."""
    monkeypatch.setenv("PATH", str(tmp_path))
    calls: list[list[str]] = []

    def runner(argv: list[str], stdin: str | None) -> str:
        calls.append(argv)
        raise FileNotFoundError(argv[0])

    firewall = Firewall(IsolationConfig(egress_policy=False), runner=runner)
    assert firewall.ensure() is False
    assert calls == []
