"""Which Xid codes matter, after NVIDIA's Xid catalog (docs.nvidia.com/deploy/xid-errors).

Most Xids (13, 31, 43, 45...) are the workload's own fault and the GPU is fine
once the process exits; those are counted, never cordoned. The critical ones
below mean the hardware or its firmware is broken until a reset or RMA.
"""

from __future__ import annotations

CRITICAL_XIDS: dict[int, str] = {
    48: "double-bit ECC error",
    62: "internal micro-controller halt",
    64: "ECC page retirement or row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
    140: "unrecovered ECC error",
}

# AMD has no Xids. Its GPU reset notification (amdsmi GPU_PRE_RESET: amdgpu recovering
# from a hang) travels the same event path under a code outside NVIDIA's range, so it is
# counted (gpu_xid_errors_total{xid="1000"}) and judged here like the rest.
AMD_GPU_RESET = 1000

# Worth flagging but the GPU stays leasable.
DEGRADING_XIDS: dict[int, str] = {
    63: "ECC page retirement or row remapping recorded (reset to apply)",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    AMD_GPU_RESET: "AMD GPU reset by the driver (recovered from a hang)",
}


def describe(code: int) -> str:
    return CRITICAL_XIDS.get(code) or DEGRADING_XIDS.get(code) or "application or driver error"
