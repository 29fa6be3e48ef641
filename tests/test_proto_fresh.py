"""The committed generated protocol modules match the .proto sources."""

from __future__ import annotations

from pathlib import Path

from gpuagent import protogen


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    """Regenerating into a temp dir gives byte-identical files: nobody edited a .proto
    without running `make proto`, or edited generated code by hand."""
    written = protogen.generate(tmp_path)
    assert written, "protoc generated nothing"
    stale = [
        str(rel)
        for rel in written
        if not (protogen.ROOT / rel).exists()
        or (protogen.ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()
    ]
    assert not stale, f"stale generated files, run `make proto`: {stale}"
    committed = {
        p.relative_to(protogen.ROOT)
        for p in (protogen.ROOT / protogen.PROTO_DIR).iterdir()
        if p.name.endswith(protogen.GENERATED_SUFFIXES)
    }
    assert committed == set(written), "generated files without a .proto source"


def test_every_message_and_field_is_documented() -> None:
    """PROTOCOL.md names every message of protocol v1 (the document is the contract)."""
    from gpuagent.v1 import (
        acl_pb2,
        attestation_pb2,
        common_pb2,
        coordinator_pb2,
        inventory_pb2,
        leases_pb2,
        ledger_pb2,
        nodes_pb2,
        relay_pb2,
        usage_pb2,
    )

    text = (protogen.ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
    missing = []
    for module in (
        acl_pb2,
        attestation_pb2,
        common_pb2,
        coordinator_pb2,
        inventory_pb2,
        leases_pb2,
        ledger_pb2,
        nodes_pb2,
        relay_pb2,
        usage_pb2,
    ):
        for name, message in module.DESCRIPTOR.message_types_by_name.items():
            if f"`{name}`" not in text:
                missing.append(name)
            missing.extend(f"{name}.{f.name}" for f in message.fields if f"`{f.name}`" not in text)
    assert not missing, f"undocumented in PROTOCOL.md: {missing}"
