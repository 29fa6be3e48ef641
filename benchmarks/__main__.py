"""``python -m benchmarks``: run the attestation kernels standalone.

Subcommands: ``attest`` (self-test against a SKU), ``skus`` (the reference table),
``bandwidth`` (the copy probe alone).  ``python -m benchmarks.run`` runs the suite.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gpuagent.attest.skus import SKUS, get_sku, task_size

from .attest.backends import BACKEND_NAMES, BackendError, get_backend
from .attest.bandwidth import measure_bandwidth
from .attest.selftest import format_report, run_selftest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    attest = sub.add_parser("attest", help="attestation self-test against a declared SKU")
    attest.add_argument("--backend", choices=BACKEND_NAMES, default="auto")
    attest.add_argument("--sku", default="h100-sxm", help="declared SKU (see `skus`)")
    attest.add_argument("--size", type=int, help="n (rows and columns of C); default per backend")
    attest.add_argument("--inner", type=int, help="inner dimension K (default: --size)")
    attest.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    sub.add_parser("skus", help="print the SKU reference table")
    bw = sub.add_parser("bandwidth", help="device-to-device copy bandwidth")
    bw.add_argument("--backend", choices=BACKEND_NAMES, default="auto")
    bw.add_argument("--sku", help="compare with this SKU's datasheet bandwidth")
    bw.add_argument("--mib", type=int, default=256)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "skus":
            print(f"{'id':<14} {'fp16 TF':>8} {'fp32 TF':>8} {'mem GB':>7} {'BW GB/s':>8}  "
                  f"{'challenge n x K':<18} source")  # fmt: skip
            for s in SKUS.values():
                n, k = task_size(s)
                print(f"{s.sku_id:<14} {s.fp16_tensor_tflops:>8.1f} {s.fp32_tflops:>8.1f} "
                      f"{s.memory_bytes / 1e9:>7.0f} "
                      f"{s.memory_bandwidth_bytes_per_second / 1e9:>8.0f}"
                      f"  {f'{n} x {k}':<18} {s.source}")  # fmt: skip
            return 0
        backend = get_backend(args.backend)
        sku = get_sku(args.sku) if args.sku else None
        if args.command == "bandwidth":
            res = measure_bandwidth(backend, sku, args.mib << 20)
            extra = f" ({res.ratio_of_peak:.1%} of {sku.name})" if sku and res.ratio_of_peak else ""
            print(f"{backend.device_name()}: {res.bytes_per_second / 1e9:.1f} GB/s{extra}")
            return 0
        assert sku is not None
        report = run_selftest(
            backend, sku, size=args.size, inner=args.inner, dtype=args.dtype,
            progress=lambda msg: print(f"... {msg}", file=sys.stderr, flush=True),
        )  # fmt: skip
        print("\n".join(format_report(report)))
        return 0 if report.exact and report.protocol_verdict == "ok" else 1
    except (KeyError, ValueError, BackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
