"""The checks of ``make gpu-check``, each a function of a ``Machine`` returning a ``Check``.

A ``Machine`` is everything the checks touch on the host; ``machine.real_machine`` binds it
to the GPU, tests bind it to the fakes. Every check catches its own failure (a check
that raises is a failed check with the error, never a crashed run), so the report always
has all five.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.gpu.nvml import NvmlBackend
from agent.metrics import names
from agent.metrics.nvml_source import NvmlGpuSource
from agent.metrics.registry import build_telemetry
from benchmarks.attest.backends import Backend, MatmulOutput
from benchmarks.attest.bandwidth import measure_bandwidth
from benchmarks.footprint_bench import IDLE_CPU_TARGET, IDLE_RSS_TARGET_MB
from gpuagent.attest.messages import GpuIdentity
from gpuagent.attest.prover import Prover
from gpuagent.attest.skus import SkuSpec, identity_problem, sku_for_name, task_size
from gpuagent.attest.verifier import AttestationRejected, Verifier

from . import smi
from .crosscheck import cross_check

# Series every GPU must have in one scrape (dcgm-exporter's set the agent mirrors).
EXPECTED_SERIES = (
    names.GPU_INFO,
    names.GPU_UTILIZATION,
    names.GPU_MEMORY_USED,
    names.GPU_MEMORY_TOTAL,
    names.GPU_SM_CLOCK,
    names.GPU_TEMPERATURE,
    names.GPU_POWER,
    names.GPU_POWER_LIMIT,
    names.GPU_ENERGY + "_total",
)
ALLOCATION_BYTES = 512 * 1024**2
WORK_SECONDS = 3.0
# Power may overshoot the enforced limit briefly while the controller reacts.
POWER_OVERSHOOT = 1.10
# The copy probe lands well under the datasheet on every board (read + write, caches);
# outside this window the bandwidth figure is not plausible for the SKU.
BANDWIDTH_RATIO = (0.3, 1.1)
SLOW_MARGIN_S = 0.5


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    summary: str
    details: Mapping[str, Any] = field(default_factory=dict)


class Machine(Protocol):
    """What the checks touch; every call blocks."""

    nvml: Any  # a pynvml-shaped module (the real pynvml on hardware)

    def smi_csv(self) -> str: ...

    def detect(self) -> Mapping[str, Any]:
        """``gpu-agent detect --json`` with gpu.backend nvml, parsed."""
        ...

    def allocate(self, nbytes: int) -> None:
        """Hold ``nbytes`` on GPU 0 until ``release``."""
        ...

    def release(self) -> None: ...

    def work(self, seconds: float) -> None:
        """Run matmuls on GPU 0 for about ``seconds``."""
        ...

    def backends(self) -> Sequence[Backend]:
        """The attestation backends present (torch, CuPy), each on GPU 0."""
        ...

    def footprint(self, seconds: float) -> tuple[float, float]:
        """(% of one core, RSS MB) of the agent's NVML-live loops over ``seconds`` idle."""
        ...


def guarded(name: str, run: Callable[[], Check]) -> Check:
    try:
        return run()
    except Exception as exc:  # a broken check is a failed check, never a crashed run
        return Check(name, False, f"error: {exc!r}", {"traceback": traceback.format_exc()})


# -- 1. detect vs nvidia-smi --------------------------------------------------------------


def check_detect(machine: Machine) -> Check:
    report = machine.detect()
    rows = smi.parse(machine.smi_csv())
    gpus = list(report.get("gpus", []))
    fields = cross_check(gpus, rows)
    bad = [f for f in fields if not f.ok]
    skus = {str(g.get("uuid")): _sku_note(g) for g in gpus}
    ok = report.get("backend") == "nvml" and bool(rows) and not bad
    summary = (
        f"{len(gpus)} GPU(s), {len(fields)} fields agree with nvidia-smi"
        if ok
        else f"{len(bad)} of {len(fields)} fields differ (backend {report.get('backend')!r})"
    )
    return Check(
        "detect",
        ok,
        summary,
        {"fields": [vars(f) for f in fields], "skus": skus, "smi_command": smi.command()},
    )


def _sku_note(gpu: Mapping[str, Any]) -> str:
    sku = sku_for_name(str(gpu.get("name") or ""))
    if sku is None:
        return f"no SKU row for {gpu.get('name')!r}: add one to gpuagent/attest/skus.py"
    problem = identity_problem(sku, str(gpu.get("name")), int(gpu.get("memory_total_bytes") or 0))
    return sku.sku_id if problem is None else f"{sku.sku_id}: {problem}"


# -- 2. one scrape of the GPU collector ---------------------------------------------------


def _scrape(nvml: Any) -> dict[str, dict[str, float]]:
    """metric name -> GPU uuid -> value, from one real scrape of the agent's registry."""
    source = NvmlGpuSource(nvml)
    telemetry = build_telemetry(gpu_source=source, scrape_timeout=10.0)
    text = generate_latest(telemetry.registry).decode()
    source.close()
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            uuid = sample.labels.get("uuid")
            if uuid is not None:
                out.setdefault(sample.name, {})[uuid] = sample.value
    return out


def check_scrape(machine: Machine) -> Check:
    machine.allocate(ALLOCATION_BYTES)
    try:
        before = _scrape(machine.nvml)
        machine.work(WORK_SECONDS)
        after = _scrape(machine.nvml)
    finally:
        machine.release()
    uuids = sorted(after.get(names.GPU_INFO, {}))
    problems = [
        f"{series} missing for {uuid}"
        for series in EXPECTED_SERIES
        for uuid in uuids
        if uuid not in after.get(series, {})
    ]
    if not uuids:
        problems.append("no GPU in the scrape")
    figures: dict[str, dict[str, float]] = {}
    energy = names.GPU_ENERGY + "_total"
    for n, uuid in enumerate(uuids):
        mem = before.get(names.GPU_MEMORY_USED, {}).get(uuid, 0.0)
        e0 = before.get(energy, {}).get(uuid)
        e1 = after.get(energy, {}).get(uuid)
        power = after.get(names.GPU_POWER, {}).get(uuid)
        limit = after.get(names.GPU_POWER_LIMIT, {}).get(uuid)
        temp = after.get(names.GPU_TEMPERATURE, {}).get(uuid)
        util = after.get(names.GPU_UTILIZATION, {}).get(uuid)
        figures[uuid] = {k: v for k, v in (("memory_used_bytes", mem), ("energy_delta_joules",
                         None if e0 is None or e1 is None else e1 - e0), ("power_watts", power),
                         ("power_limit_watts", limit), ("temperature_celsius", temp),
                         ("utilization_ratio", util)) if v is not None}  # fmt: skip
        if n == 0:  # the allocation and the matmul ran on GPU 0
            if not mem > 0:
                problems.append(
                    f"{uuid}: memory used is {mem} after a {ALLOCATION_BYTES} B allocation"
                )
            if e0 is None or e1 is None or not e1 > e0:
                problems.append(
                    f"{uuid}: energy counter did not increase across a matmul ({e0} -> {e1})"
                )
        if power is not None and limit is not None and not 0 < power <= limit * POWER_OVERSHOOT:
            problems.append(f"{uuid}: power {power} W outside (0, {limit} W]")
        if temp is not None and not 0 < temp < 110:
            problems.append(f"{uuid}: temperature {temp} C implausible")
        if util is not None and not 0 <= util <= 1:
            problems.append(f"{uuid}: utilization {util} outside 0..1")
    summary = "; ".join(problems) if problems else (
        f"{len(EXPECTED_SERIES)} series for {len(uuids)} GPU(s), all plausible")  # fmt: skip
    return Check("scrape", not problems, summary, {"gpus": figures, "problems": problems})


# -- 3. NVML events --------------------------------------------------------------------


def check_events(machine: Machine) -> Check:
    backend = NvmlBackend(machine.nvml)
    backend.open()
    try:
        opened = backend.open_events()
        drained = backend.wait_events(0) if opened else []  # drain what is queued, no wait
    finally:
        backend.close()
    summary = (
        f"Xid/ECC event set registered, waited, freed ({len(drained)} event(s) queued)"
        if opened
        else "NVML refused the event set: Xids would go unseen"
    )
    return Check("events", opened, summary, {"events": [vars(e) for e in drained]})


# -- 4. attestation on the GPU ---------------------------------------------------------


class SlowedBackend:
    """The same backend with a sleep inserted before each matmul: the deliberately slow run."""

    def __init__(self, inner: Backend, delay_s: float) -> None:
        self._inner = inner
        self.delay_s = delay_s
        self.name = f"{inner.name}+sleep"
        self.simulated = inner.simulated

    def device_name(self) -> str:
        return self._inner.device_name()

    def matmul(self, nonce: bytes, n: int, inner: int, dtype: str) -> MatmulOutput:
        time.sleep(self.delay_s)  # the slowness under test, not synchronisation
        return self._inner.matmul(nonce, n, inner, dtype)

    def copy_bandwidth(self, nbytes: int, repeats: int) -> float:
        return self._inner.copy_bandwidth(nbytes, repeats)


@dataclass(frozen=True)
class Round:
    passed: bool
    reason: str
    message: str
    measured_tflops: float
    seconds: float


def attest_round(
    backend: Backend, sku: SkuSpec, identity: GpuIdentity, sizes: tuple[int, int]
) -> Round:
    """One challenge -> commit -> reveal -> open round, the verifier on the CPU."""
    key = Ed25519PrivateKey.generate()
    verifier = Verifier(skus={sku.sku_id: sku})
    prover = Prover(key.sign, backend, lambda _uuid: identity)
    started = time.perf_counter()
    challenge = verifier.issue(key.public_key(), [(identity.uuid, sku.sku_id)], sizes=sizes)
    # As the coordinator does: the verifier's secret entries are computed while the GPU
    # works, so their CPU time is not charged to the GPU's commit time.
    preparing = threading.Thread(target=verifier.prepare, args=(challenge.challenge_id,))
    preparing.start()
    try:
        commitment = prover.commit(challenge, challenge.tasks[0])
        reveal = verifier.check_commitment(commitment)
        preparing.join()
        verdict = verifier.check_openings(prover.open(reveal))
    except AttestationRejected as exc:
        preparing.join()
        return Round(False, exc.reason.value, exc.message, 0.0, time.perf_counter() - started)
    return Round(verdict.passed, verdict.reason, verdict.message, verdict.measured_tflops,
                 time.perf_counter() - started)  # fmt: skip


def gpu0_identity(nvml: Any) -> GpuIdentity:
    backend = NvmlBackend(nvml)
    backend.open()
    try:
        info = backend.inventory()[0]
    finally:
        backend.close()
    return GpuIdentity(info.uuid or "", info.name or "", info.serial or "", info.pci_bus_id or "",
                       info.memory_total_bytes or 0)  # fmt: skip


def check_attestation(
    machine: Machine,
    *,
    skus: Callable[[str], SkuSpec | None] = sku_for_name,
    sizes: tuple[int, int] | None = None,
    bandwidth_bytes: int = 256 * 1024**2,
) -> Check:
    backends = list(machine.backends())
    if not backends:
        return Check("attestation", False, "no GPU attestation backend (torch or CuPy) loads")
    identity = gpu0_identity(machine.nvml)
    sku = skus(identity.name)
    if sku is None:
        return Check("attestation", False, f"no SKU row for {identity.name!r}: the band is unknown")
    n, inner = sizes or task_size(sku)
    fastest, slowest = sku.time_bounds(n, inner, "fp16")
    results: dict[str, Any] = {}
    problems = []
    for backend in backends:
        try:
            honest = attest_round(backend, sku, identity, (n, inner))
            slowed = attest_round(SlowedBackend(backend, slowest + SLOW_MARGIN_S), sku, identity,
                                  (n, inner))  # fmt: skip
            bw = measure_bandwidth(backend, sku, bandwidth_bytes)
        except Exception as exc:  # e.g. torch < 2.8 (no fp32-output GEMM): the next backend runs
            results[backend.name] = {"error": repr(exc)}
            problems.append(f"{backend.name}: {exc!r}")
            continue
        ratio = bw.ratio_of_peak or 0.0
        results[backend.name] = {
            "device": backend.device_name(),
            "honest": vars(honest),
            "slowed": vars(slowed),
            "tflops_vs_peak": honest.measured_tflops / (sku.peak_flops("fp16") / 1e12),
            "bandwidth_bytes_per_second": bw.bytes_per_second,
            "bandwidth_vs_peak": ratio,
        }
        if not honest.passed:
            problems.append(f"{backend.name}: honest run failed: {honest.reason}: {honest.message}")
        if slowed.passed or slowed.reason != "too_slow":
            problems.append(f"{backend.name}: slowed run was {slowed.reason}, expected too_slow")
        if not BANDWIDTH_RATIO[0] <= ratio <= BANDWIDTH_RATIO[1]:
            problems.append(f"{backend.name}: bandwidth {ratio:.0%} of the datasheet, implausible")
    details = {"sku": sku.sku_id, "n": n, "inner": inner, "band_seconds": [fastest, slowest],
               "backends": results, "problems": problems}  # fmt: skip
    summary = (
        "; ".join(problems)
        if problems
        else ", ".join(
            f"{name} {r['honest']['measured_tflops']:.0f} TFLOPS ({r['tflops_vs_peak']:.0%}), "
            f"{r['bandwidth_bytes_per_second'] / 1e9:.0f} GB/s; slowed run too_slow"
            for name, r in results.items()
        )
    )
    return Check("attestation", not problems, f"{sku.sku_id}: {summary}", details)


# -- 5. footprint -----------------------------------------------------------------------


def check_footprint(machine: Machine, seconds: float) -> Check:
    cpu, rss = machine.footprint(seconds)
    ok = cpu < IDLE_CPU_TARGET and rss < IDLE_RSS_TARGET_MB
    summary = (f"{cpu:.2f} % of one core, {rss:.0f} MB RSS over {seconds:.0f} s idle "
               f"(targets < {IDLE_CPU_TARGET} %, < {IDLE_RSS_TARGET_MB:.0f} MB)")  # fmt: skip
    return Check("footprint", ok, summary, {"cpu_percent": cpu, "rss_mb": rss, "seconds": seconds})


def run_all(
    machine: Machine,
    *,
    idle_seconds: float = 60.0,
    skus: Callable[[str], SkuSpec | None] = sku_for_name,
    sizes: tuple[int, int] | None = None,
    bandwidth_bytes: int = 256 * 1024**2,
) -> list[Check]:
    return [
        guarded("detect", lambda: check_detect(machine)),
        guarded("scrape", lambda: check_scrape(machine)),
        guarded("events", lambda: check_events(machine)),
        guarded(
            "attestation",
            lambda: check_attestation(
                machine, skus=skus, sizes=sizes, bandwidth_bytes=bandwidth_bytes
            ),
        ),
        guarded("footprint", lambda: check_footprint(machine, idle_seconds)),
    ]
