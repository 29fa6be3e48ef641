"""The scheduler's other doors: /metrics (loopback by default, TLS and basic auth when
configured) and the CLI's token sources (flag, environment, a private file)."""

from __future__ import annotations

import argparse
import asyncio
import ssl
import stat
from pathlib import Path

import httpx
import pytest

from scheduler.cli import main
from scheduler.client import NoToken, resolve_token
from scheduler.config import MetricsConfig, SchedulerConfig
from scheduler.metrics import MetricsSecurity, SchedulerMetrics, start_metrics_server
from tests.coordinator_harness import make_pki
from tests.test_scheduler_leases import make_env


def test_metrics_listen_on_loopback_by_default() -> None:
    """Nothing but the scraper on the same host reaches /metrics unless asked."""
    assert MetricsConfig().listen == "127.0.0.1:9471"
    assert SchedulerConfig().metrics.listen is not None
    assert SchedulerConfig().metrics.listen.startswith("127.0.0.1:")  # type: ignore[union-attr]


def test_metrics_over_tls_with_basic_auth(tmp_path: Path) -> None:
    """With a certificate and basic auth, a scrape needs both: plain HTTP fails, no or
    wrong credentials get 401, the right ones get the metrics."""
    pki = make_pki(tmp_path)
    metrics = SchedulerMetrics(nodes=lambda: {}, leases=lambda: {})
    security = MetricsSecurity(pki.cert_file, pki.key_file, "prom", "s3cret-pass")
    server = start_metrics_server("127.0.0.1:0", metrics, security)
    try:
        url = f"https://localhost:{server.port}/metrics"
        verify = ssl.create_default_context(cafile=str(pki.ca_file))
        with httpx.Client(verify=verify, timeout=5) as client:
            assert client.get(url).status_code == 401
            assert client.get(url, auth=("prom", "wrong")).status_code == 401
            assert client.get(url, auth=("other", "s3cret-pass")).status_code == 401
            good = client.get(url, auth=("prom", "s3cret-pass"))
            assert good.status_code == 200 and "gpu_scheduler" in good.text
        with pytest.raises(httpx.HTTPError), httpx.Client(timeout=5) as plain:
            plain.get(f"http://localhost:{server.port}/metrics")
    finally:
        server.close()


def _args(**kw: object) -> argparse.Namespace:
    return argparse.Namespace(**kw)


def test_the_cli_takes_the_flag_then_the_environment_then_a_private_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--token wins over GPU_SCHEDULER_TOKEN, which wins over the token file; a file
    others can read is refused (its mode named), a missing one says how to get one."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("GPU_SCHEDULER_TOKEN", raising=False)
    with pytest.raises(NoToken, match="no token: pass --token"):
        resolve_token(_args())
    path = tmp_path / "gpu-scheduler" / "token"
    path.parent.mkdir()
    path.write_text("gst_file\n")
    path.chmod(0o644)
    with pytest.raises(NoToken, match="readable by others \\(mode 0644\\)"):
        resolve_token(_args())
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert resolve_token(_args()) == "gst_file"
    monkeypatch.setenv("GPU_SCHEDULER_TOKEN", "gst_env")
    assert resolve_token(_args()) == "gst_env"
    assert resolve_token(_args(token="gst_flag")) == "gst_flag"


@pytest.mark.asyncio
async def test_a_missing_or_bad_token_fails_the_cli_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 1 and one line saying which (no token / bad token) and how to get one."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("GPU_SCHEDULER_TOKEN", raising=False)
    async with make_env(tmp_path) as env:
        conn = ["--address", f"127.0.0.1:{env.server.port}", "--insecure"]
        for extra, expect in (([], "no token"), (["--token", "gst_bad"], "UNAUTHENTICATED")):
            code = await asyncio.to_thread(main, ["leases", *conn, *extra])
            err = capsys.readouterr().err
            assert code == 1 and expect in err and "tokens create" in err
            assert err.count("\n") == 1


@pytest.mark.parametrize(
    "command",
    ["nodes", "submit", "leases", "logs", "output", "usage", "balance", "acl", "tokens", "config"],
)
def test_client_commands_import_neither_the_server_nor_numpy(command: str) -> None:
    """`gpu-scheduler nodes --help` and every client command's help build and print
    without the server, numpy or the attestation verifier (a fresh interpreter checks
    ``sys.modules`` after the command ran)."""
    import subprocess
    import sys

    code = (
        "import contextlib, io, sys; from scheduler import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try: cli.main([sys.argv[1], '--help'])\n"
        "    except SystemExit as exc: assert exc.code == 0, exc.code\n"
        "assert 'usage:' in out.getvalue(), out.getvalue()\n"
        "bad = [m for m in ('numpy', 'scheduler.server', 'gpuagent.attest.verifier', "
        "'gpuagent.attest.generator') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
