"""Read a ``GpuSnapshot`` from AMD GPUs through the AMD backend (amdsmi).

The backend already applies amdsmi's rules (unsupported fields dropped once, "N/A" as
None, a vanished GPU marked lost), so this adapter only maps its readings onto the
collector's series: a field the backend dropped is a ``not_supported`` field error, a
lost GPU a ``gpu_lost`` one. Blocking: the collector calls it from a worker thread.
"""

from __future__ import annotations

from agent.gpu.amdsmi_backend import AmdSmiBackend
from agent.gpu.model import GpuInfo

from .gpu_sample import FieldError, GpuReading, GpuSnapshot, XidSource


class AmdSmiGpuSource:
    """``GpuSource`` over ``AmdSmiBackend``; static facts are read once, on first use."""

    def __init__(self, backend: AmdSmiBackend, xids: XidSource | None = None) -> None:
        self._backend = backend
        self._xids = xids
        self._static: dict[int, GpuInfo] | None = None

    def device_count(self) -> int:
        return self._backend.device_count()

    def read(self) -> GpuSnapshot:
        backend = self._backend
        if self._static is None:
            self._static = {info.index: info for info in backend.inventory()}
        errors: list[FieldError] = []
        readings = []
        for index in range(backend.device_count()):
            sample = backend.sample(index)
            info = self._static.get(index)
            if sample.lost or sample.uuid is None:
                errors.append(FieldError(index, "uuid", "gpu_lost"))
                continue
            energy = backend.energy_joules(index)
            errors.extend(
                FieldError(index, name, "not_supported") for name in backend.dropped_fields(index)
            )
            total, used = sample.memory_total_bytes, sample.memory_used_bytes
            ecc: dict[str, int] = {}
            if sample.ecc_corrected is not None:
                ecc["corrected"] = sample.ecc_corrected
            if sample.ecc_uncorrected is not None:
                ecc["uncorrected"] = sample.ecc_uncorrected
            readings.append(
                GpuReading(
                    index=index,
                    uuid=sample.uuid,
                    model=(info.name if info else None) or "unknown",
                    pci_bus_id=info.pci_bus_id if info else None,
                    compute_capability=info.compute_capability if info else None,
                    utilization_ratio=sample.utilization_ratio,
                    memory_used_bytes=used,
                    memory_free_bytes=total - used
                    if total is not None and used is not None
                    else None,
                    memory_total_bytes=total,
                    sm_clock_hertz=sample.sm_clock_mhz * 1e6 if sample.sm_clock_mhz else None,
                    memory_clock_hertz=(
                        sample.memory_clock_mhz * 1e6 if sample.memory_clock_mhz else None
                    ),
                    temperature_celsius=sample.temperature_celsius,
                    power_watts=sample.power_watts,
                    power_limit_watts=info.power_limit_watts if info else None,
                    energy_joules_total=energy,
                    ecc_errors_total=ecc,
                    xid_errors_total=self._xids.counts(sample.uuid) if self._xids else {},
                    xid_last_timestamp_seconds=(
                        self._xids.last_timestamp(sample.uuid) if self._xids else None
                    ),
                )
            )
        driver, _rocm = backend.driver_versions()
        return GpuSnapshot(
            gpus=tuple(readings), driver_version=driver, cuda_version=None,
            field_errors=tuple(errors),
        )  # fmt: skip
