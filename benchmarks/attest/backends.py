"""Compute backends: torch or CuPy on CUDA when installed, NumPy on the CPU otherwise.

Every backend produces the same C bit for bit: the generator is the integer recipe in
:mod:`generator`, and entries are small integers whose products and partial sums fp32
holds exactly.  GPU backends generate A and B on the device in K-chunks (generating on
the host and copying would make the host, not the GPU, the thing being timed) and
accumulate ``C += A_chunk @ B_chunk^T`` with fp16/bf16 inputs and fp32 output.

torch and CuPy are optional and imported lazily; they are typed loosely on purpose.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gpuagent.attest.backend import Backend as Backend  # re-exported: the kernels implement it
from gpuagent.attest.backend import BackendError as BackendError
from gpuagent.attest.backend import MatmulOutput as MatmulOutput
from gpuagent.attest.generator import (
    ENTRIES_PER_WORD,
    check_inner,
    lines,
    lines_generic,
    matrix_key,
)

# Entries per K-chunk on a GPU: large enough that each GEMM saturates the tensor cores,
# small enough that the int64 generator temporaries (n x chunk/4 words) stay modest.
GPU_CHUNK = 4096
# The CPU computes in fp32 BLAS on whole-row blocks of this many rows to bound memory.
CPU_ROW_BLOCK = 2048


class NumpyBackend:
    """The CPU reference: simulated mode, tests and the verifier's ground truth."""

    name = "numpy"
    simulated = True

    def device_name(self) -> str:
        return "CPU (numpy)"

    def matmul(self, nonce: bytes, n: int, inner: int, dtype: str) -> MatmulOutput:
        check_inner(inner)
        _check_dtype(dtype)
        start = time.perf_counter()
        # Small integers are exact in float32 too; CPU BLAS has no fast fp16 GEMM, and the
        # result is the same bits whatever the input storage type.
        b_t = lines(matrix_key(nonce, b"B"), np.arange(n), 0, inner).astype(np.float32)
        key_a = matrix_key(nonce, b"A")
        c = np.empty((n, n), dtype=np.int32)
        for lo in range(0, n, CPU_ROW_BLOCK):
            hi = min(n, lo + CPU_ROW_BLOCK)
            a = lines(key_a, np.arange(lo, hi), 0, inner).astype(np.float32)
            c[lo:hi] = (a @ b_t.T).astype(np.int32)
        return c, time.perf_counter() - start

    def copy_bandwidth(self, nbytes: int, repeats: int) -> float:
        src = np.ones(max(1, nbytes), dtype=np.uint8)
        dst = np.empty_like(src)
        np.copyto(dst, src)  # first touch: page faults are not bandwidth
        start = time.perf_counter()
        for _ in range(repeats):
            np.copyto(dst, src)
        return 2.0 * src.nbytes * repeats / (time.perf_counter() - start)


def _check_dtype(dtype: str) -> None:
    if dtype not in ("fp16", "bf16"):
        raise ValueError(f"unsupported dtype {dtype!r}: use fp16 or bf16")


class TorchBackend:
    """CUDA or ROCm through torch >= 2.8 (``torch.addmm(..., out_dtype=torch.float32)``)."""

    name = "torch"
    simulated = False

    def __init__(self, device: str = "cuda:0") -> None:
        try:
            torch = importlib.import_module("torch")
        except ImportError as exc:
            raise BackendError("torch is not installed") from exc
        # A ROCm build of torch answers through torch.cuda too (HIP underneath), so the
        # same code runs on AMD Instinct; torch.version.hip says which one this is.
        self.platform = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        if not torch.cuda.is_available():
            raise BackendError(f"torch ({self.platform}) is installed but sees no GPU")
        self._torch: Any = torch
        self._device: Any = torch.device(device)

    def device_name(self) -> str:
        return str(self._torch.cuda.get_device_name(self._device))

    def _lines(self, key_tag: bytes, nonce: bytes, n: int, start: int, length: int) -> Any:
        torch = self._torch
        rows = torch.arange(n, dtype=torch.int64, device=self._device)
        words = torch.arange(
            start // ENTRIES_PER_WORD, (start + length) // ENTRIES_PER_WORD,
            dtype=torch.int64, device=self._device,
        )  # fmt: skip
        return lines_generic(matrix_key(nonce, key_tag), rows, words, lambda p: torch.stack(p, -1))

    def matmul(self, nonce: bytes, n: int, inner: int, dtype: str) -> MatmulOutput:
        check_inner(inner)
        _check_dtype(dtype)
        torch = self._torch
        tdtype = torch.float16 if dtype == "fp16" else torch.bfloat16
        torch.cuda.synchronize(self._device)
        start = time.perf_counter()
        c = torch.zeros((n, n), dtype=torch.float32, device=self._device)
        for lo in range(0, inner, GPU_CHUNK):
            length = min(GPU_CHUNK, inner - lo)
            a = self._lines(b"A", nonce, n, lo, length).to(tdtype)
            b_t = self._lines(b"B", nonce, n, lo, length).to(tdtype)
            try:
                c = torch.addmm(c, a, b_t.T, out_dtype=torch.float32)
            except TypeError as exc:  # torch < 2.8: no fp32 output for fp16 GEMMs
                raise BackendError(
                    "torch >= 2.8 is needed (fp32-output fp16/bf16 GEMM via out_dtype)"
                ) from exc
        c_int = c.to(torch.int32)
        torch.cuda.synchronize(self._device)
        elapsed = time.perf_counter() - start
        return np.ascontiguousarray(c_int.cpu().numpy(), dtype=np.int32), elapsed

    def copy_bandwidth(self, nbytes: int, repeats: int) -> float:
        torch = self._torch
        src = torch.ones(max(1, nbytes), dtype=torch.uint8, device=self._device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        torch.cuda.synchronize(self._device)
        start = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
        torch.cuda.synchronize(self._device)
        return float(2.0 * src.numel() * repeats / (time.perf_counter() - start))


class CupyBackend:
    """CUDA through CuPy; the GEMM calls cublasGemmEx (fp16/bf16 in, fp32 out and compute)."""

    name = "cupy"
    simulated = False

    def __init__(self, device: int = 0) -> None:
        try:
            cupy = importlib.import_module("cupy")
        except ImportError as exc:
            raise BackendError("cupy is not installed") from exc
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CuPy raises its own CUDARuntimeError without a device
            raise BackendError(f"cupy sees no CUDA device: {exc}") from exc
        self._cp: Any = cupy
        self._device_id = device

    def device_name(self) -> str:
        props = self._cp.cuda.runtime.getDeviceProperties(self._device_id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def _lines(self, key_tag: bytes, nonce: bytes, n: int, start: int, length: int) -> Any:
        cp = self._cp
        rows = cp.arange(n, dtype=cp.int64)
        words = cp.arange(start // ENTRIES_PER_WORD, (start + length) // ENTRIES_PER_WORD,
                          dtype=cp.int64)  # fmt: skip
        return lines_generic(matrix_key(nonce, key_tag), rows, words, lambda p: cp.stack(p, -1))

    def matmul(self, nonce: bytes, n: int, inner: int, dtype: str) -> MatmulOutput:
        check_inner(inner)
        _check_dtype(dtype)
        cp = self._cp
        cublas, device, runtime = cp.cuda.cublas, cp.cuda.device, cp.cuda.runtime

        in_type = runtime.CUDA_R_16F if dtype == "fp16" else runtime.CUDA_R_16BF
        cp_dtype = cp.float16 if dtype == "fp16" else None
        compute = getattr(cublas, "CUBLAS_COMPUTE_32F", 68)
        algo = getattr(cublas, "CUBLAS_GEMM_DEFAULT", -1)
        alpha = np.array(1.0, dtype=np.float32)
        beta = np.array(1.0, dtype=np.float32)
        with cp.cuda.Device(self._device_id):
            handle = device.get_cublas_handle()
            cp.cuda.Stream.null.synchronize()
            start = time.perf_counter()
            c = cp.zeros((n, n), dtype=cp.float32)
            for lo in range(0, inner, GPU_CHUNK):
                length = min(GPU_CHUNK, inner - lo)
                a = self._to_half(self._lines(b"A", nonce, n, lo, length), cp_dtype)
                b_t = self._to_half(self._lines(b"B", nonce, n, lo, length), cp_dtype)
                # Row-major C = A @ B_t^T is column-major C^T = B_t @ A^T: op(B_t^T)=T, op(A^T)=N.
                cublas.gemmEx(
                    handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n, n, length,
                    alpha.ctypes.data, b_t.data.ptr, in_type, length,
                    a.data.ptr, in_type, length,
                    beta.ctypes.data, c.data.ptr, runtime.CUDA_R_32F, n, compute, algo,
                )  # fmt: skip
            c_int = c.astype(cp.int32)
            cp.cuda.Stream.null.synchronize()
            elapsed = time.perf_counter() - start
        return np.ascontiguousarray(cp.asnumpy(c_int), dtype=np.int32), elapsed

    def _to_half(self, entries: Any, cp_dtype: Any) -> Any:
        cp = self._cp
        if cp_dtype is not None:
            return cp.ascontiguousarray(entries.astype(cp_dtype))
        # CuPy has no bfloat16 dtype: small integers are exact in bf16, whose bits are the
        # top half of the float32 bits, so build them by shifting.
        bits = entries.astype(cp.float32).view(cp.uint32) >> 16
        return cp.ascontiguousarray(bits.astype(cp.uint16))

    def copy_bandwidth(self, nbytes: int, repeats: int) -> float:
        cp = self._cp
        with cp.cuda.Device(self._device_id):
            src = cp.ones(max(1, nbytes), dtype=cp.uint8)
            dst = cp.empty_like(src)
            dst[...] = src
            cp.cuda.Stream.null.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                dst[...] = src
            cp.cuda.Stream.null.synchronize()
            return float(2.0 * src.size * repeats / (time.perf_counter() - start))


BACKEND_NAMES = ("auto", "torch", "cupy", "numpy")


def get_backend(name: str = "auto", device: int = 0) -> Backend:
    """A ready backend on GPU ``device``; ``auto`` prefers torch, then CuPy, then numpy
    (simulated; ``device`` means nothing there)."""
    if name == "numpy":
        return NumpyBackend()
    if name == "torch":
        return TorchBackend(f"cuda:{device}")
    if name == "cupy":
        return CupyBackend(device)
    if name != "auto":
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    factories: tuple[tuple[str, Callable[[], Backend]], ...] = (
        ("torch", lambda: TorchBackend(f"cuda:{device}")),
        ("cupy", lambda: CupyBackend(device)),
    )
    for module, factory in factories:
        if importlib.util.find_spec(module) is not None:
            try:
                return factory()
            except BackendError:
                continue
    return NumpyBackend()
