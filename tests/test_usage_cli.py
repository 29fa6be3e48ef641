"""``gpu-agent usage``: local totals and the pending/acked split, as a user runs it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.cli import main
from agent.usage.outbox import OUTBOX_FILE_NAME, Outbox
from gpuagent.usage import Unmeasured, UsageRecord

S = 10**9
KEY = Ed25519PrivateKey.generate()


def _record(lease_id: str, index: int, *, final: bool = False) -> UsageRecord:
    start = 1_700_000_000 * S + index * 60 * S
    return UsageRecord(
        node_id="node-cli",
        seq=0,
        lease_id=lease_id,
        start_unix_ns=start,
        end_unix_ns=start + 60 * S,
        duration_ns=60 * S,
        gpu_count=2,
        gpu_ns=120 * S,
        cpu_usec=30 * 10**6,
        energy_mj=18_000_000,
        final=final,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    with Outbox(state / OUTBOX_FILE_NAME) as box:
        box.append_many([_record("lease-a", i) for i in range(3)], KEY.sign)
        box.append_many([_record("lease-b", 0), _record("lease-b", 1, final=True)], KEY.sign)
        box.ack(2)
    path = tmp_path / "config.yaml"
    path.write_text(f"node:\n  state_dir: {state}\n")
    return path


def test_usage_shows_totals_and_ack_state(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The table lists each lease with records, acked/pending split and GPU-hours."""
    assert main(["-c", str(config), "usage"]) == 0
    out = capsys.readouterr().out
    assert "last seq 5, acked through 2, pending 3" in out
    lines = {
        line.split()[0]: line.split() for line in out.splitlines() if line.startswith("lease-")
    }
    assert lines["lease-a"][1:5] == ["running", "3", "2", "1"]
    assert lines["lease-b"][1:5] == ["ended", "2", "0", "2"]
    assert lines["lease-a"][6] == "0.100"  # 3 x 60 s x 2 GPUs = 0.1 GPU-hours


def test_usage_for_one_lease_as_json(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--lease --json gives that lease's exact integer totals for scripts."""
    assert main(["-c", str(config), "usage", "--lease", "lease-b", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    [lease] = doc["leases"]
    assert lease["lease_id"] == "lease-b"
    assert (lease["records"], lease["acked"], lease["pending"]) == (2, 0, 2)
    assert lease["gpu_ns"] == 240 * S and lease["final"] is True
    assert doc["outbox"]["acked_seq"] == 2


def test_unknown_lease_and_missing_outbox_are_errors(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown lease or a state dir without an outbox exit 1 with the path named."""
    assert main(["-c", str(config), "usage", "--lease", "nope"]) == 1
    assert "no usage recorded for lease 'nope'" in capsys.readouterr().err
    empty = tmp_path / "empty.yaml"
    empty.write_text(f"node:\n  state_dir: {tmp_path / 'nothing'}\n")
    assert main(["-c", str(empty), "usage"]) == 1
    assert "no usage outbox at" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()  # looking must not create a state dir


def test_unreadable_network_shows_unknown_not_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A lease whose network counters could not be read shows NET-RX/NET-TX as
    unknown; one with some intervals unread shows a flagged lower bound."""
    state = tmp_path / "state"
    blind = dataclasses.replace(_record("lease-blind", 0), unmeasured=int(Unmeasured.NETWORK))
    part = dataclasses.replace(_record("lease-part", 0), net_rx_bytes=2048, net_tx_bytes=1024)
    with Outbox(state / OUTBOX_FILE_NAME) as box:
        box.append_many([blind, part, dataclasses.replace(blind, lease_id="lease-part")], KEY.sign)
    path = tmp_path / "config.yaml"
    path.write_text(f"node:\n  state_dir: {state}\n")
    assert main(["-c", str(path), "usage"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("lease-")]
    lines = {row[0]: row for row in rows}
    assert lines["lease-blind"][9:11] == ["unknown", "unknown"]
    assert lines["lease-part"][9:11] == [">=2.0KiB?", ">=1.0KiB?"]
    assert "network counters unreadable" in out
