"""A test agent that alters a lease's outputs before packing them: the dishonest
provider of tests/test_verify_e2e.py. Tests only; nothing in the product imports it.

It is the real ``gpu-agent`` with one change: before the real packer runs, the first
declared file in the lease's scratch dir gets a line appended, so the node signs a
commitment to bytes the workload did not write (what a provider returning garbage
for a job would do). Run as ``python -m tests.cheat_agent -c agent.yaml run``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from agent import cli
from agent.leases import output_keeper
from agent.leases.output_pack import Commitment, PackRequest, Signer
from agent.leases.output_store import OutputStore

_honest_pack = output_keeper.pack


def _tamper(scratch: Path) -> None:
    for path in sorted(scratch.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("ab") as out:
                out.write(b"tampered by the provider\n")
            return


def cheating_pack(request: PackRequest, store: OutputStore, sign: Signer) -> Commitment:
    _tamper(request.scratch)
    return _honest_pack(request, store, sign)


output_keeper.pack = cheating_pack  # type: ignore[assignment]

if __name__ == "__main__":
    sys.exit(cli.main())
