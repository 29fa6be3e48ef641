"""``gpu-agent attest``: local attestation self-test on the configured backend.

Runs the same challenge -> commit -> reveal -> open round trip the coordinator drives,
against a local verifier, and prints the figures beside the declared SKU's datasheet
peak.  The SKU comes from ``--sku`` (repeatable), else from the simulated GPU profile
in the config.
"""

from __future__ import annotations

import argparse
import sys

from gpuagent.attest.skus import SKUS, SkuSpec, get_sku

from .cli import UsageError, load_config_from_args
from .config import AgentConfig

# benchmarks.attest.backends.BACKEND_NAMES; not imported here because the CLI imports
# every command module at startup and backends brings numpy into the daemon's RSS.
BACKEND_NAMES = ("auto", "torch", "cupy", "numpy")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "attest",
        help="run the attestation benchmark locally and compare with a SKU's peak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sku",
        action="append",
        metavar="SKU",
        help=f"declared SKU, repeatable (known: {', '.join(SKUS)}); "
        "default: the config's simulated GPU profile",
    )
    p.add_argument(
        "--backend", choices=BACKEND_NAMES, help="override attestation.backend from the config"
    )
    p.add_argument("--size", type=int, help="n, rows and columns of C (default: per backend)")
    p.add_argument("--inner", type=int, help="inner dimension K (default: --size)")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    p.set_defaults(handler=_attest)


def _profile_sku(config: AgentConfig) -> SkuSpec:
    from agent.gpu.profiles import get_profile

    return get_profile(config.gpu.simulated.profile).sku


def _attest(args: argparse.Namespace) -> int:
    from benchmarks.attest.backends import BackendError, get_backend
    from benchmarks.attest.selftest import format_report, run_selftest

    config = load_config_from_args(args)
    backend_name = args.backend or config.attestation.backend
    try:
        skus = [get_sku(s) for s in args.sku] if args.sku else [_profile_sku(config)]
    except KeyError as exc:
        raise UsageError(str(exc.args[0])) from None
    if args.size is not None and args.size < 1:
        raise UsageError(f"--size must be positive, got {args.size}")
    try:
        backend = get_backend(backend_name)
    except BackendError as exc:
        print(f"error: attestation backend {backend_name!r}: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    ok = True
    for sku in skus:
        step = [0]

        def progress(message: str, step: list[int] = step) -> None:
            step[0] += 1
            print(f"[{step[0]}/3] {message} ...", file=sys.stderr, flush=True)  # noqa: T201

        try:
            report = run_selftest(
                backend, sku, size=args.size, inner=args.inner, dtype=args.dtype, progress=progress
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        print("\n".join(format_report(report)))  # noqa: T201
        if backend.simulated:
            print("note: numpy is the simulated CPU backend; timing is reported, not judged")  # noqa: T201
            ok &= report.exact and report.protocol_verdict == "ok"
        else:
            ok &= report.passed
    return 0 if ok else 1
