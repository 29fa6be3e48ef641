"""``gpu-agent leases`` and ``gpu-agent logs LEASE``: the local view of leases.

Both read the state DB under ``node.state_dir`` and ask Docker for what it
knows; they work while the daemon runs (SQLite WAL lets readers in) and when it
is stopped.
"""

# ruff: noqa: T201 - a CLI command: printing is its output

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import docker
import docker.errors

from .cli import load_config_from_args
from .config import AgentConfig
from .leases.docker_runtime import LABEL_LEASE, LABEL_MANAGED, container_name
from .leases.output_store import OutputStore, RetainedOutput
from .leases.records import LeaseRecord
from .leases.statedb import STATE_DB_NAME, StateDB, StateDBError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    leases = sub.add_parser("leases", help="list leases from the local state DB and Docker")
    leases.add_argument("--all", action="store_true", help="include finished leases")
    leases.add_argument("--json", action="store_true", help="one JSON object per lease")
    leases.set_defaults(handler=_leases)
    logs = sub.add_parser("logs", help="print a lease's container output")
    logs.add_argument("lease_id", metavar="LEASE")
    logs.add_argument("--tail", type=int, default=100, metavar="N", help="last N lines (100)")
    logs.set_defaults(handler=_logs)


def _open_db(config: AgentConfig) -> StateDB | None:
    path = config.node.state_dir / STATE_DB_NAME
    if not path.exists():
        print(f"no state DB at {path}: the agent has not run with this state_dir", file=sys.stderr)
        return None
    try:
        return StateDB(path)
    except StateDBError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _docker(config: AgentConfig) -> docker.DockerClient | None:
    try:
        client = docker.DockerClient(base_url=config.runtime.docker_host, timeout=10)
        client.ping()
    except Exception as exc:  # any failure means the same: show the DB view only
        print(f"warning: Docker unreachable ({exc}); container status unknown", file=sys.stderr)
        return None
    return client


def _container_status(client: docker.DockerClient | None, record: LeaseRecord) -> str:
    if client is None or not record.container_id:
        return "-" if client is not None else "?"
    try:
        container = client.containers.get(record.container_id)
    except docker.errors.NotFound:
        return "gone"
    return str(container.status)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _leases(args: argparse.Namespace) -> int:
    config = load_config_from_args(args)
    db = _open_db(config)
    if db is None:
        return 1
    records = db.leases(active_only=not args.all)
    client = _docker(config)
    now = time.time()
    retained = {r.lease_id: r for r in OutputStore(config.outputs_dir()).retained()}
    rows: list[dict[str, Any]] = []
    for record in records:
        rows.append(
            {
                "lease_id": record.lease_id,
                "state": record.state.value,
                "gpus": list(record.gpu_uuids),
                "container": (record.container_id or "")[:12],
                "docker": _container_status(client, record),
                "exit_code": record.exit_code,
                "age": _age(now - record.created_at),
                "expires_in": _age(record.expires_at - now)
                if record.expires_at and record.expires_at > now
                else "",
                "reason": record.reason,
                "restarts": int(record.extra.get("restarts", 0) or 0),
                # As last reported by the daemon (it stores each report in the record);
                # an ended lease has none.
                "endpoints": []
                if record.state.terminal
                else list(record.extra.get("endpoints") or []),
                "outputs": _retained_json(retained.get(record.lease_id)),
            }
        )
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        header = (
            "LEASE",
            "STATE",
            "GPUS",
            "CONTAINER",
            "DOCKER",
            "EXIT",
            "AGE",
            "EXPIRES",
            "REASON",
        )
        table = [header] + [
            (
                r["lease_id"],
                r["state"],
                ",".join(r["gpus"]) or "-",
                r["container"] or "-",
                r["docker"],
                "-" if r["exit_code"] is None else str(r["exit_code"]),
                r["age"],
                r["expires_in"] or "-",
                r["reason"][:60],
            )
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
        for row, data in zip(table, [None, *rows], strict=True):
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
            for line in _endpoint_lines(data):
                print("    " + line)
        _print_retained(list(retained.values()))
    if client is not None:
        _warn_unclaimed(client, {r.lease_id for r in db.leases()})
    return 0


def _retained_json(kept: RetainedOutput | None) -> dict[str, Any] | None:
    if kept is None:
        return None
    return {
        "archive": str(kept.archive),
        "size": kept.size,
        "digest": kept.digest_hex,
        "retained_until_unix_nanos": kept.retained_until_unix_nanos,
    }


def _print_retained(kept: list[RetainedOutput]) -> None:
    """Outputs kept for buyers (of finished leases too: they outlive the lease)."""
    if not kept:
        return
    total = sum(k.size for k in kept)
    print(f"\nretained outputs: {len(kept)} archive(s), {total} bytes")
    for k in kept:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k.retained_until_unix_nanos / 1e9))
        print(f"  {k.lease_id}  {k.size} bytes  digest {k.digest_hex[:16]}...  until {until} UTC")


def _endpoint_lines(row: dict[str, Any] | None) -> list[str]:
    if not row or not row["endpoints"]:
        return []
    lines = [f"endpoints (restarts {row['restarts']}):"]
    for e in row["endpoints"]:
        checked = e.get("last_check_at")
        when = time.strftime("%H:%M:%S", time.gmtime(checked)) if checked else "never"
        result = f" ({str(e.get('last_result', ''))[:80]})" if e.get("last_result") else ""
        # Direct mode: where this agent serves the port itself.
        direct = f"  direct {e['direct_address']}" if e.get("direct_address") else ""
        lines.append(
            f"  {e.get('name', '?'):<15} {e.get('protocol', '?')}/{e.get('container_port', '?')}"
            f"  {'ready' if e.get('ready') else 'not ready'}  last check {when}{result}{direct}"
        )
    return lines


def _warn_unclaimed(client: docker.DockerClient, known: set[str]) -> None:
    managed = client.containers.list(all=True, filters={"label": f"{LABEL_MANAGED}=true"})
    for container in managed:
        lease_id = container.labels.get(LABEL_LEASE, "")
        if lease_id not in known:
            print(
                f"note: container {container.short_id} ({container.name}) is labelled for lease "
                f"{lease_id!r}, which this state DB does not know; the agent removes such "
                "orphans at its next start if the node id matches",
                file=sys.stderr,
            )


def _logs(args: argparse.Namespace) -> int:
    config = load_config_from_args(args)
    if args.tail < 1:
        print("error: --tail must be at least 1", file=sys.stderr)
        return 2
    db = _open_db(config)
    record = db.get(args.lease_id) if db is not None else None
    client = _docker(config)
    if client is not None:
        ref = (record.container_id if record else None) or container_name(args.lease_id)
        try:
            data = client.api.logs(ref, stdout=True, stderr=True, tail=args.tail)
        except docker.errors.NotFound:
            pass
        else:
            sys.stdout.write(bytes(data).decode("utf-8", errors="replace"))
            return 0
    if record is None:
        where = config.node.state_dir / STATE_DB_NAME
        print(f"error: no lease {args.lease_id!r} in {where} or in Docker", file=sys.stderr)
        return 1
    # The container is gone; the state DB keeps the tail taken when it ended.
    lines = record.log_tail.splitlines(keepends=True)[-args.tail :]
    sys.stdout.write("".join(lines))
    if not lines:
        print(f"(no output kept for lease {args.lease_id}, state {record.state})", file=sys.stderr)
    return 0
