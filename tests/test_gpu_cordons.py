"""CordonStore: persisted, atomic, shared between the daemon and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.gpu.cordons import CordonFileError, CordonStore


def test_cordon_persists_across_instances(tmp_path: Path) -> None:
    """A cordon written by one store is read by a fresh one (a restart)."""
    CordonStore(tmp_path).cordon("GPU-a", "Xid 79", "health", 3)
    fresh = CordonStore(tmp_path)
    fresh.load()
    entry = fresh.get("GPU-a")
    assert entry is not None
    assert (entry.reason, entry.source, entry.index) == ("Xid 79", "health", 3)


def test_first_reason_wins(tmp_path: Path) -> None:
    """Cordoning an already cordoned GPU keeps the original cordon."""
    store = CordonStore(tmp_path)
    store.cordon("GPU-a", "first", "health")
    assert store.cordon("GPU-a", "second", "operator").reason == "first"


def test_reload_sees_other_writer_and_keeps_both_updates(tmp_path: Path) -> None:
    """Two stores on one file: neither loses the other's update; reload notices the change."""
    daemon, cli = CordonStore(tmp_path), CordonStore(tmp_path)
    daemon.load()
    assert not daemon.reload_if_changed()
    daemon.cordon("GPU-a", "ecc", "health")
    cli.cordon("GPU-b", "maintenance", "operator")
    assert daemon.reload_if_changed()
    assert set(daemon.cordons()) == {"GPU-a", "GPU-b"}
    cli.uncordon("GPU-a")
    assert daemon.reload_if_changed()
    assert set(daemon.cordons()) == {"GPU-b"}
    assert "GPU-a" in daemon.released()


def test_release_is_consumed_with_acknowledged_ecc(tmp_path: Path) -> None:
    """The daemon consumes an uncordon and records the ECC count it forgave."""
    store = CordonStore(tmp_path)
    store.cordon("GPU-a", "ecc", "health")
    store.uncordon("GPU-a")
    store.consume_release("GPU-a", 4)
    assert store.released() == {}
    assert store.acknowledged_ecc("GPU-a") == 4


def test_file_is_replaced_atomically_and_is_valid_json(tmp_path: Path) -> None:
    """The file is whole JSON after every write, and no temp files are left behind."""
    store = CordonStore(tmp_path)
    for n in range(5):
        store.cordon(f"GPU-{n}", "x", "operator")
    data = json.loads(store.path.read_text())
    assert data["version"] == 1 and len(data["cordons"]) == 5
    assert not list(tmp_path.glob(".cordons.*.tmp"))


def test_corrupt_file_error_names_path(tmp_path: Path) -> None:
    """A corrupt cordon file gives an error naming the file and what to do."""
    (tmp_path / "cordons.json").write_text("{not json")
    store = CordonStore(tmp_path)
    with pytest.raises(CordonFileError, match=r"cordons\.json.*not a valid cordon file"):
        store.load()


def test_missing_file_means_no_cordons(tmp_path: Path) -> None:
    """No file yet: nothing is cordoned."""
    store = CordonStore(tmp_path / "new")
    store.load()
    assert store.cordons() == {}
