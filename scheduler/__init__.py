"""The reference coordinator: gRPC server, node registry, placement, ledger."""
