"""``gpu-agent status``: ask the running agent how it is doing.

Reads ``GET /status`` (and ``/readyz``) from ``status.listen`` with a short
timeout. Exit 0 when the agent answers and is ready, 1 when it answers but is
not ready or does not answer at all (with what to check next).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import httpx

from .cli import load_config_from_args
from .metrics.server import ListenError, parse_listen

GIB = 1024**3


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser("status", help="show the running agent's state (reads status.listen)")
    status.add_argument(
        "--address", metavar="HOST:PORT", help="agent status endpoint (default: status.listen)"
    )
    status.add_argument("--json", action="store_true", help="print the raw JSON status document")
    status.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="HTTP timeout (default 5)"
    )
    status.set_defaults(handler=_status)


def base_url(listen: str) -> str:
    """URL to reach an agent listening on ``listen`` (wildcard hosts mean loopback)."""
    host, port = parse_listen(listen)
    if host in ("0.0.0.0", ""):  # noqa: S104 - comparing, not binding
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"error: {message}\n")
    return code


def _status(args: argparse.Namespace) -> int:
    listen = args.address or load_config_from_args(args).status.listen
    try:
        url = base_url(listen)
    except ListenError as exc:
        return _fail(str(exc), 2)
    try:
        with httpx.Client(base_url=url, timeout=args.timeout) as client:
            response = client.get("/status")
            response.raise_for_status()
            doc: dict[str, Any] = response.json()
            # /readyz runs the checks now (bounded by the agent's scrape timeout);
            # it answers 503 with the same JSON shape when not ready.
            readyz = client.get("/readyz")
            if readyz.status_code in (200, 503):
                doc["readiness"] = readyz.json()
    except httpx.ConnectError:
        return _fail(f"no agent answers at {url} (is it running? try: systemctl status gpu-agent)")
    except httpx.TimeoutException:
        return _fail(f"the agent at {url} did not answer within {args.timeout:g}s")
    except (httpx.HTTPError, ValueError) as exc:
        return _fail(f"bad answer from {url}: {exc}")
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(doc) + "\n")
    ready = (doc.get("readiness") or {}).get("ready")
    return 0 if ready in (True, None) else 1


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _num(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, fmt)


def render(doc: dict[str, Any], now: float | None = None) -> str:
    """The status document as a short human report."""
    now = time.time() if now is None else now
    lines: list[str] = []
    agent = doc.get("agent", {})
    lines.append(
        f"agent        {agent.get('version', '?')} (protocol {agent.get('protocol', '?')}), "
        f"pid {agent.get('pid', '?')}, up {_age(agent.get('uptime_seconds'))}"
    )
    coord = doc.get("coordinator")
    if isinstance(coord, dict) and "error" not in coord:
        state = "connected" if coord.get("connected") else "DISCONNECTED"
        last = coord.get("last_heartbeat_at")
        lines.append(
            f"coordinator  {state} ({coord.get('address', '?')}), last heartbeat "
            f"{_age(now - last) + ' ago' if last else 'never'}, "
            f"{coord.get('reconnects', 0)} reconnects"
        )
    ready = doc.get("readiness")
    if isinstance(ready, dict) and "checks" in ready:
        failing = [f"{k}: {v.get('detail')}" for k, v in ready["checks"].items() if not v.get("ok")]
        lines.append(
            "ready        " + ("yes" if ready.get("ready") else "NO - " + "; ".join(failing))
        )
    gpus = doc.get("gpus")
    if isinstance(gpus, dict) and "devices" in gpus:
        devices = gpus["devices"]
        cordoned = sum(1 for d in devices if d.get("cordoned"))
        lines.append(
            f"gpus         {len(devices)} ({cordoned} cordoned), driver "
            f"{gpus.get('driver_version') or '?'}, CUDA {gpus.get('cuda_version') or '?'}, "
            f"sample {_age(gpus.get('sample_age_seconds'))} old"
        )
        for d in devices:
            mem = f"{_num(d.get('memory_used_bytes'), '.1f', 1 / GIB)}/"
            mem += f"{_num(d.get('memory_total_bytes'), '.1f', 1 / GIB)} GiB"
            health = d.get("health", "?")
            if d.get("cordoned"):
                health += f", cordoned: {d.get('cordon_reason') or 'no reason'}"
            lines.append(
                f"  {d.get('index')}  {d.get('model')}  util "
                f"{_num(d.get('utilization_ratio'), '.0f', 100)}%  mem {mem}  "
                f"{_num(d.get('temperature_celsius'), '.0f')}C  "
                f"{_num(d.get('power_watts'), '.0f')}W  "
                f"lease {d.get('lease_id') or '-'}  {health}"
            )
    leases = doc.get("leases")
    if isinstance(leases, dict) and "by_state" in leases:
        by_state = leases["by_state"]
        text = ", ".join(f"{k} {v}" for k, v in by_state.items()) or "none"
        lines.append(f"leases       {text}")
    usage = doc.get("usage")
    if isinstance(usage, dict) and "records_pending" in usage:
        lines.append(
            f"usage        {usage['records_pending']} records pending, oldest "
            f"{_age(usage.get('oldest_pending_age_seconds')) if usage['records_pending'] else '-'}"
        )
    for name, section in doc.items():
        if isinstance(section, dict) and "error" in section:
            lines.append(f"{name:<12} unavailable: {section['error']}")
    return "\n".join(lines)
