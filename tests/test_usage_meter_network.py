"""Network bytes in a lease's usage records: measured, or flagged unknown, never a silent 0."""

from __future__ import annotations

from agent.usage.cgroup import ContainerCounters
from agent.usage.intervals import Point
from agent.usage.meter import RX, TX, LeaseMeter
from agent.usage.outbox import LeaseCursor
from gpuagent.usage import Unmeasured

S = 10**9


def _close(meter: LeaseMeter, at_s: int) -> tuple[int, int, int]:
    closed = meter.close("node", Point(at_s * S, at_s * S), S, final=False)
    assert closed is not None
    records, cursor = closed
    meter.commit(cursor)
    rx = sum(r.net_rx_bytes for r in records)
    tx = sum(r.net_tx_bytes for r in records)
    return rx, tx, records[-1].unmeasured & Unmeasured.NETWORK


def test_unreadable_network_counters_are_unknown_not_zero() -> None:
    """A lease whose counters cannot be read (hidden /proc, no lease network) has
    records with the network bit set in ``unmeasured`` and no bytes."""
    meter = LeaseMeter.new_lease("L1", Point(0, 0), ())
    meter.add_sample(1 * S, ContainerCounters(cpu_usec=5), {})
    meter.add_sample(2 * S, ContainerCounters(cpu_usec=9), {})
    assert _close(meter, 2) == (0, 0, Unmeasured.NETWORK)


def test_a_new_lease_counts_from_zero() -> None:
    """A fresh container's counters start at zero, so its first reading is all traffic."""
    meter = LeaseMeter.new_lease("L1", Point(0, 0), ())
    meter.add_sample(1 * S, ContainerCounters(net_rx_bytes=700, net_tx_bytes=30), {})
    assert _close(meter, 1) == (700, 30, 0)


def test_first_reading_after_unknown_is_a_baseline_not_zero_bytes() -> None:
    """Carried over a restart as unknown, the counters' next reading is only a
    baseline: that interval stays flagged unmeasured instead of billing 0 bytes as
    measured; from then on the deltas count."""
    cursor = LeaseCursor("L1", 0, 0, {RX: None, TX: None})
    meter = LeaseMeter(cursor, ())
    meter.add_sample(1 * S, ContainerCounters(net_rx_bytes=5000, net_tx_bytes=400), {})
    assert _close(meter, 1) == (0, 0, Unmeasured.NETWORK)
    meter.add_sample(2 * S, ContainerCounters(net_rx_bytes=5600, net_tx_bytes=450), {})
    assert _close(meter, 2) == (600, 50, 0)
