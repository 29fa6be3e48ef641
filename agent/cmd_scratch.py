"""``gpu-agent scratch-mount``: make the scratch root a nosuid,nodev mount (root only).

For hosts where the agent itself cannot mount (the shipped systemd unit: no
CAP_SYS_ADMIN), so scratch quotas are measured rather than enforced by a loop
filesystem. The unit runs this as a privileged pre-start (``ExecStartPre=+``), in the
host's mount namespace, so Docker's bind of each lease's dir inherits the flags and a
setuid file a lease plants there is inert on the host too. Idempotent.
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli import UsageError, load_config_from_args
from .leases.scratch import ScratchError, mount_root_nosuid, root_flags_missing, unmount_root


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "scratch-mount",
        help="make the lease scratch root a nosuid,nodev bind mount (root; systemd pre-start)",
    )
    parser.add_argument(
        "--remove", action="store_true", help="unmount it again (install.sh --uninstall)"
    )
    parser.set_defaults(handler=_mount)


def _mount(args: argparse.Namespace) -> int:
    root = load_config_from_args(args).scratch_root()
    if os.geteuid() != 0:
        raise UsageError("scratch-mount needs root (the systemd unit runs it with ExecStartPre=+)")
    if args.remove:
        try:
            removed = unmount_root(root)
        except ScratchError as exc:
            print(f"error: {root}: {exc}", file=sys.stderr)  # noqa: T201
            return 1
        print(f"{root}: {'unmounted' if removed else 'not a mount point'}")  # noqa: T201
        return 0
    try:
        changed = mount_root_nosuid(root)
    except (ScratchError, OSError) as exc:
        print(f"error: {root}: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    missing = root_flags_missing(root)
    if missing:  # e.g. a file system that refuses the remount
        print(f"error: {root} is still not {','.join(missing)}", file=sys.stderr)  # noqa: T201
        return 1
    print(f"{root}: {'mounted' if changed else 'already'} nosuid,nodev")  # noqa: T201
    return 0
